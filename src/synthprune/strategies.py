"""Prune criteria and grow strategies, registered by name.

Each strategy is a small function; none of them selects or checks anything itself:

* a **prune criterion** maps the layer's connection values ``[nnz]`` to scores ``[nnz]``;
  the shared selection removes the ``k`` lowest (:func:`synthprune.topology.select_lowest`);
* a **grow strategy** gets a :class:`GrowContext` and the number of connections to grow, and
  returns a *proposer* ``propose(n, generator) -> keys``: candidates in order of preference.
  The shared primitive :func:`synthprune.topology.place_growth` skips existing connections and
  repeats, counts fallbacks and guarantees the exact count.

Register new ones with :func:`register_prune` / :func:`register_grow`; the CLI lists them
with :func:`list_strategies`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from synthprune.topology import Proposer, normal_cdf, top_gradient_slots, zscore

__all__ = [
    "GrowContext",
    "get_grow",
    "get_prune",
    "grow_options",
    "input_strength",
    "list_strategies",
    "output_strength",
    "register_grow",
    "register_prune",
]

PruneFn = Callable[[torch.Tensor], torch.Tensor]
GrowFn = Callable[..., Proposer]

_PRUNE: dict[str, PruneFn] = {}
_GROW: dict[str, GrowFn] = {}
_NEEDS_GRADIENT: set[str] = set()


@dataclass
class GrowContext:
    """What a grow strategy may look at: one layer after pruning (all tensors on CPU).

    Attributes:
        n_in, n_out: layer shape (inputs, outputs).
        keys: ``[nnz]`` sorted keys of the surviving connections (``row * n_in + col``).
        values: ``[nnz]`` their weights, same order.
        inputs, grad_outputs: ``[batch, n_in]`` / ``[batch, n_out]`` for gradient-based growth
            (on the layer's device), or ``None`` when no batch was given.
    """

    n_in: int
    n_out: int
    keys: torch.Tensor
    values: torch.Tensor
    inputs: torch.Tensor | None = None
    grad_outputs: torch.Tensor | None = None
    rows: torch.Tensor = field(init=False)
    cols: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.rows = self.keys // self.n_in
        self.cols = self.keys % self.n_in


def register_prune(name: str) -> Callable[[PruneFn], PruneFn]:
    def wrap(fn: PruneFn) -> PruneFn:
        _PRUNE[name] = fn
        return fn

    return wrap


def register_grow(name: str, *, needs_gradient: bool = False) -> Callable[[GrowFn], GrowFn]:
    """Register ``fn(ctx, count, **options) -> proposer``; its keyword-only parameters are the
    strategy's options (validated by the Rewirer)."""

    def wrap(fn: GrowFn) -> GrowFn:
        _GROW[name] = fn
        if needs_gradient:
            _NEEDS_GRADIENT.add(name)
        return fn

    return wrap


def _lookup(table: dict, kind: str, name: str):
    if name not in table:
        raise ValueError(f"unknown {kind} {name!r}; valid: {', '.join(sorted(table))}")
    return table[name]


def get_prune(name: str) -> PruneFn:
    return _lookup(_PRUNE, "prune criterion", name)


def get_grow(name: str) -> GrowFn:
    return _lookup(_GROW, "grow strategy", name)


def needs_gradient(name: str) -> bool:
    return name in _NEEDS_GRADIENT


def grow_options(name: str) -> dict[str, object]:
    """The options a grow strategy takes, with their defaults."""
    params = inspect.signature(get_grow(name)).parameters.values()
    return {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}


def list_strategies() -> dict[str, list[str]]:
    """``{"prune": [...], "grow": [...]}``, sorted."""
    return {"prune": sorted(_PRUNE), "grow": sorted(_GROW)}


# --------------------------------------------------------------------------- prune criteria


@register_prune("magnitude")
def magnitude_scores(values: torch.Tensor) -> torch.Tensor:
    """Smallest ``|w|`` first."""
    return values.abs()


@register_prune("set")
def set_scores(values: torch.Tensor) -> torch.Tensor:
    """SET's criterion: the smallest positive and the largest negative weights go first, in
    equal *fractions* of each sign -- pruning the k lowest of these scores removes ≈ζ of the
    positive and ≈ζ of the negative weights, with an exact total. Exact zeros (e.g. connections
    grown at 0 that never moved) go before either, as in SET's reference code."""
    scores = torch.full_like(values, -1.0)
    for sign_mask, magnitude in ((values > 0, values), (values < 0, -values)):
        n = int(sign_mask.sum())
        if n:
            ranks = torch.empty(n, dtype=values.dtype)
            ranks[torch.sort(magnitude[sign_mask], stable=True).indices] = torch.arange(n, dtype=values.dtype)
            scores[sign_mask] = (ranks + 0.5) / n  # fraction of its sign group below it
    return scores


# --------------------------------------------------------------------------- grow strategies


@register_grow("none")
def grow_none(ctx: GrowContext, count: int) -> Proposer:
    """Static sparse: the Rewirer prunes and grows nothing (``count`` is always 0)."""
    return lambda n, generator: torch.empty(0, dtype=torch.long)


@register_grow("random")
def grow_random(ctx: GrowContext, count: int) -> Proposer:
    """SET: uniform over the empty slots."""
    n_slots = ctx.n_in * ctx.n_out
    return lambda n, generator: torch.randint(0, n_slots, (n,), generator=generator)


@register_grow("gradient", needs_gradient=True)
def grow_gradient(ctx: GrowContext, count: int) -> Proposer:
    """RigL: the empty slots with the largest ``|∂L/∂w|`` on the given batch, best first."""
    if ctx.inputs is None or ctx.grad_outputs is None:
        raise ValueError("grow='gradient' needs a batch: call rewirer.step(batch=(inputs, targets))")
    ranked: list[torch.Tensor] = []

    def propose(n: int, generator: torch.Generator) -> torch.Tensor:
        if not ranked or ranked[0].numel() < n:  # computed once per step unless more are asked
            ranked[:] = [top_gradient_slots(ctx.inputs, ctx.grad_outputs, ctx.keys, n)]
        return ranked[0][:n]

    return propose


def input_strength(ctx: GrowContext) -> torch.Tensor:
    """``s_i = Σ_j |w_ji|`` for each input-side neuron i: ``[n_in]``."""
    return torch.zeros(ctx.n_in, dtype=ctx.values.dtype).index_add_(0, ctx.cols, ctx.values.abs())


def output_strength(ctx: GrowContext) -> torch.Tensor:
    """``t_j = Σ_i |w_ji|`` for each output-side neuron j: ``[n_out]``."""
    return torch.zeros(ctx.n_out, dtype=ctx.values.dtype).index_add_(0, ctx.rows, ctx.values.abs())


def _free_in_block(ctx: GrowContext, starts: torch.Tensor, ends: torch.Tensor) -> int:
    """Empty slots between the chosen start (input) and end (output) nodes (boolean masks)."""
    occupied = int((starts[ctx.cols] & ends[ctx.rows]).sum())
    return int(starts.sum()) * int(ends.sum()) - occupied


@register_grow("synthesis")
def grow_synthesis(
    ctx: GrowContext,
    count: int,
    *,
    endpoint: str = "cdf",
    kappa_start: float = 0.0,
    kappa_end: float = 1.0,
) -> Proposer:
    """Strategic synthesis (Finlinson & Moschoyiannis 2020; our interpretation, DESIGN §2.3).

    Start nodes are the strong input-side nodes (strength z-score ≥ ``kappa_start``), each drawn
    with probability ∝ its strength. Endpoints: ``"cdf"`` draws output nodes with probability
    ∝ Φ(z_j), the Gaussian CDF of their strength's z-score, so strong endpoints are favoured
    and weak ones stay possible; ``"tail"`` draws uniformly among outputs with z ≥ ``kappa_end``,
    relaxing κ by 0.5 until the start × endpoint block has ``count`` free slots. Work and memory
    are O(n_in + n_out + nnz + count): no dense score matrix is ever formed.
    """
    if endpoint not in ("cdf", "tail"):
        raise ValueError(f"unknown endpoint {endpoint!r}; valid: cdf, tail")
    s, t = input_strength(ctx), output_strength(ctx)
    start_mask = zscore(s) >= kappa_start
    start_p = torch.where(start_mask, s, torch.zeros_like(s))
    if not float(start_p.sum()) > 0:  # no strength information yet (e.g. all weights zero)
        start_mask, start_p = torch.ones_like(start_mask), torch.ones_like(s)
    z_end = zscore(t)
    if endpoint == "cdf":
        end_p = normal_cdf(z_end)
    else:
        kappa = kappa_end
        end_mask = z_end >= kappa
        while _free_in_block(ctx, start_mask, end_mask) < count and not bool(end_mask.all()):
            kappa -= 0.5
            end_mask = z_end >= kappa
        end_p = end_mask.to(t.dtype)

    def propose(n: int, generator: torch.Generator) -> torch.Tensor:
        starts = torch.multinomial(start_p, n, replacement=True, generator=generator)
        ends = torch.multinomial(end_p, n, replacement=True, generator=generator)
        return ends * ctx.n_in + starts

    return propose


def grown_share_at_top_decile(ctx: GrowContext, new_keys: torch.Tensor) -> float:
    """Share of new connections whose start (input) node is in the top decile of strength.

    Random growth gives ≈0.1; synthesis should give far more. NaN when nothing was grown."""
    if new_keys.numel() == 0:
        return float("nan")
    s = input_strength(ctx)
    threshold = torch.quantile(s, 0.9)
    return float((s[new_keys % ctx.n_in] >= threshold).float().mean())

