"""Prune criteria and grow strategies, registered by name.

Each strategy is a small function; none of them selects or checks anything itself:

* a **prune criterion** maps the layer's connection values ``[nnz]`` to scores ``[nnz]``;
  the shared selection removes the ``k`` lowest (:func:`synthprune.topology.select_lowest`);
* a **grow strategy** gets a :class:`GrowContext` and the number of connections to grow, and
  returns a *proposer* ``propose(n, generator) -> keys``: candidates in order of preference.
  The shared primitive :func:`synthprune.topology.place_growth` skips existing connections and
  repeats, counts fallbacks and guarantees the exact count.

Register new ones with :func:`register_prune` / :func:`register_grow` (docs/strategies.md); a
name is registered once (``replace=True`` to replace one on purpose). A grow strategy's record
(:class:`GrowStrategy`) also holds its flags -- ``static`` (the Rewirer prunes and grows
nothing outside compression), ``needs_gradient`` (``step(batch=...)`` required) -- and its
``diagnostics``, the extra figures it adds to each layer report. The CLI lists them with
:func:`list_strategies` and loads a user's module of strategies with ``--strategies``.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from synthprune.topology import (
    Proposer,
    multinomial_with_replacement,
    normal_cdf,
    top_dense_slots,
    top_gradient_slots,
    zscore,
)

__all__ = [
    "GrowContext",
    "GrowStrategy",
    "get_grow",
    "get_grow_strategy",
    "get_prune",
    "grow_options",
    "import_strategies",
    "input_strength",
    "list_strategies",
    "output_strength",
    "register_grow",
    "register_prune",
]

PruneFn = Callable[[torch.Tensor], torch.Tensor]
GrowFn = Callable[..., Proposer]
Diagnostics = Callable[["GrowContext", torch.Tensor], dict[str, float]]


@dataclass(frozen=True)
class GrowStrategy:
    """A registered grow strategy: its function and what the Rewirer must know of it."""

    name: str
    fn: GrowFn
    needs_gradient: bool = False  # proposes from |∂L/∂w|: step(batch=...) is required
    static: bool = False  # the wiring stays as it is: nothing is pruned or grown outside compression
    diagnostics: Diagnostics | None = None  # (context, grown keys) -> extra report figures

    @property
    def options(self) -> dict[str, object]:
        """The strategy's options (its keyword-only parameters) with their defaults."""
        params = inspect.signature(self.fn).parameters.values()
        return {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}


_PRUNE: dict[str, PruneFn] = {}
_GROW: dict[str, GrowStrategy] = {}


@dataclass
class GrowContext:
    """What a grow strategy may look at: one layer after pruning (all tensors on CPU).

    Attributes:
        n_in, n_out: the layer's weight-matrix shape (columns, rows): a convolution's is
            ``[C_out, C_in/groups · K]`` (:class:`~synthprune.layers.SparseLayer`).
        keys: ``[nnz]`` sorted keys of the surviving connections (``row * n_in + col``).
        values: ``[nnz]`` their weights, same order.
        inputs, grad_outputs: ``[batch, n_in]`` / ``[batch, n_out]`` for gradient-based growth
            on a linear layer (on the layer's device), or ``None``.
        gradient: ``[n_out, n_in]`` dense ``∂L/∂W`` for gradient-based growth on a
            convolution, or ``None``.
        kernel_positions: matrix columns per input node (``K`` for a convolution, 1 for a
            linear layer): column ``c·K + p`` is input channel ``c`` at kernel position ``p``.
    """

    n_in: int
    n_out: int
    keys: torch.Tensor
    values: torch.Tensor
    inputs: torch.Tensor | None = None
    grad_outputs: torch.Tensor | None = None
    gradient: torch.Tensor | None = None
    kernel_positions: int = 1
    rows: torch.Tensor = field(init=False)
    cols: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.rows = self.keys // self.n_in
        self.cols = self.keys % self.n_in

    @property
    def input_nodes(self) -> int:
        """Input features, or input channels of a convolution."""
        return self.n_in // self.kernel_positions


def _check_new(table: dict, kind: str, name: str, replace: bool) -> None:
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"a {kind} name must be a Python identifier, got {name!r}")
    if name in table and not replace:
        raise ValueError(f"{kind} {name!r} is already registered; pick another name, or pass replace=True "
                         "to replace it on purpose")


def register_prune(name: str, *, replace: bool = False) -> Callable[[PruneFn], PruneFn]:
    """Register ``fn(values [nnz]) -> scores [nnz]`` (lowest pruned first) as ``name``."""
    _check_new(_PRUNE, "prune criterion", name, replace)

    def wrap(fn: PruneFn) -> PruneFn:
        _PRUNE[name] = fn
        return fn

    return wrap


def register_grow(name: str, *, needs_gradient: bool = False, static: bool = False,
                  diagnostics: Diagnostics | None = None, replace: bool = False) -> Callable[[GrowFn], GrowFn]:
    """Register ``fn(ctx, count, **options) -> proposer`` as ``name``; its keyword-only
    parameters are the strategy's options (validated by the Rewirer and the config). See
    :class:`GrowStrategy` for the flags."""
    _check_new(_GROW, "grow strategy", name, replace)

    def wrap(fn: GrowFn) -> GrowFn:
        _GROW[name] = GrowStrategy(name, fn, needs_gradient, static, diagnostics)
        return fn

    return wrap


def _lookup(table: dict, kind: str, name: str):
    if name not in table:
        raise ValueError(f"unknown {kind} {name!r}; valid: {', '.join(sorted(table))}")
    return table[name]


def get_prune(name: str) -> PruneFn:
    return _lookup(_PRUNE, "prune criterion", name)


def get_grow_strategy(name: str) -> GrowStrategy:
    return _lookup(_GROW, "grow strategy", name)


def get_grow(name: str) -> GrowFn:
    return get_grow_strategy(name).fn


def needs_gradient(name: str) -> bool:
    return get_grow_strategy(name).needs_gradient


def grow_options(name: str) -> dict[str, object]:
    """The options a grow strategy takes, with their defaults."""
    return get_grow_strategy(name).options


def import_strategies(source: str) -> None:
    """Import a user's module that registers strategies: a dotted module name (importable from
    the current folder or ``sys.path``) or the path of a ``.py`` file."""
    import importlib
    import importlib.util
    import sys
    from pathlib import Path

    is_file = source.endswith(".py") or "/" in source
    if is_file and not Path(source).is_file():
        raise ValueError(f"--strategies {source}: no such file")
    try:
        if is_file:
            path = Path(source)
            name = f"synthprune_user_{path.stem}"
            if name in sys.modules:
                return
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
        else:
            if "" not in sys.path and "." not in sys.path:
                sys.path.insert(0, "")  # a module in the current folder, as `python -m` would find it
            importlib.import_module(source)
    except Exception as exc:  # a user's module can raise anything on import: one line naming it
        raise ValueError(f"--strategies {source}: cannot import it ({exc.__class__.__name__}: {exc})") from None


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
    positive, negative = values > 0, values < 0
    order = _sign_then_magnitude_order(values, positive, negative)
    n_pos, n_neg = int(positive.sum()), int(negative.sum())
    n_zero = values.numel() - n_pos - n_neg

    def fractions(n: int) -> torch.Tensor:  # rank within the sign group -> fraction below it
        return (torch.arange(n, dtype=values.dtype) + 0.5) / n

    scores = torch.empty_like(values)
    scores[order] = torch.cat([torch.full((n_zero,), -1.0, dtype=values.dtype), fractions(n_pos), fractions(n_neg)])
    return scores


def _sign_then_magnitude_order(values: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    """Positions of ``values`` ordered as zeros, then positive weights by magnitude, then
    negative ones by magnitude; ties keep position order (exactly the order of a stable sort
    within each sign group). The bit pattern of a non-negative float orders like the float, so
    for floats up to 32 bits one stable sort of integer keys does it; float64 bit patterns
    leave no room for a group offset in int64, so there a second stable sort orders groups."""
    group = torch.where(negative, 2, positive.long())  # 0 zero, 1 positive, 2 negative
    if values.element_size() <= 4:
        bits = values.abs().view({4: torch.int32, 2: torch.int16}[values.element_size()]).long()
        keys = torch.where(group == 0, -1, bits + (group - 1) * (1 << (8 * values.element_size())))
        return torch.sort(keys, stable=True).indices
    by_magnitude = torch.sort(values.abs(), stable=True).indices
    return by_magnitude[torch.sort(group[by_magnitude], stable=True).indices]


# --------------------------------------------------------------------------- grow strategies


def top_decile_diagnostics(ctx: GrowContext, new_keys: torch.Tensor) -> dict[str, float]:
    """``top_decile_share``: the share of grown connections starting at a top-decile-strength
    input (≈0.1 for uniform growth; what synthesis is meant to raise)."""
    return {"top_decile_share": grown_share_at_top_decile(ctx, new_keys)}


@register_grow("none", static=True)
def grow_none(ctx: GrowContext, count: int) -> Proposer:
    """Static sparse: the Rewirer prunes and grows nothing (``count`` is always 0)."""
    return lambda n, generator: torch.empty(0, dtype=torch.long)


@register_grow("random", diagnostics=top_decile_diagnostics)
def grow_random(ctx: GrowContext, count: int) -> Proposer:
    """SET: uniform over the empty slots."""
    n_slots = ctx.n_in * ctx.n_out
    return lambda n, generator: torch.randint(0, n_slots, (n,), generator=generator)


@register_grow("gradient", needs_gradient=True, diagnostics=top_decile_diagnostics)
def grow_gradient(ctx: GrowContext, count: int) -> Proposer:
    """RigL: the empty slots with the largest ``|∂L/∂w|`` on the given batch(es), best first."""
    if ctx.gradient is None and (ctx.inputs is None or ctx.grad_outputs is None):
        raise ValueError("grow='gradient' needs a batch: call rewirer.step(batch=(inputs, targets))")
    ranked: list[torch.Tensor] = []

    def propose(n: int, generator: torch.Generator) -> torch.Tensor:
        if not ranked or ranked[0].numel() < n:  # computed once per step unless more are asked
            ranked[:] = [top_dense_slots(ctx.gradient, ctx.keys, n) if ctx.gradient is not None
                         else top_gradient_slots(ctx.inputs, ctx.grad_outputs, ctx.keys, n)]
        return ranked[0][:n]

    return propose


def input_strength(ctx: GrowContext) -> torch.Tensor:
    """``s_i = Σ_j |w_ji|`` for each input-side node i: ``[input_nodes]`` (a convolution's input
    channel sums over its kernel positions too)."""
    return torch.zeros(ctx.input_nodes, dtype=ctx.values.dtype).index_add_(
        0, ctx.cols // ctx.kernel_positions, ctx.values.abs())


def output_strength(ctx: GrowContext) -> torch.Tensor:
    """``t_j = Σ_i |w_ji|`` for each output-side neuron j: ``[n_out]``."""
    return torch.zeros(ctx.n_out, dtype=ctx.values.dtype).index_add_(0, ctx.rows, ctx.values.abs())


def _free_in_block(ctx: GrowContext, starts: torch.Tensor, ends: torch.Tensor) -> int:
    """Empty slots between the chosen start (input) and end (output) nodes (boolean masks)."""
    occupied = int((starts[ctx.cols // ctx.kernel_positions] & ends[ctx.rows]).sum())
    return int(starts.sum()) * ctx.kernel_positions * int(ends.sum()) - occupied


@register_grow("synthesis", diagnostics=top_decile_diagnostics)
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

    On a convolution the nodes are channels: an input channel's strength sums ``|w|`` over
    every output channel and kernel position, start channels and endpoint (output) channels
    are drawn as above, and the kernel position of each new weight is drawn uniformly.
    """
    if endpoint not in ("cdf", "tail"):
        raise ValueError(f"unknown endpoint {endpoint!r}; valid: cdf, tail")
    for name, kappa in (("kappa_start", kappa_start), ("kappa_end", kappa_end)):
        if not math.isfinite(kappa):
            raise ValueError(f"{name} must be a finite z-score, got {kappa!r}")
    s, t = input_strength(ctx), output_strength(ctx)
    start_mask = zscore(s) >= kappa_start
    start_p = torch.where(start_mask, s, torch.zeros_like(s))
    if not float(start_p.sum()) > 0:  # no strength information yet (e.g. all weights zero)
        start_mask, start_p = torch.ones_like(start_mask), torch.ones_like(s)
    z_end = zscore(t)
    if endpoint == "cdf":
        end_p = normal_cdf(z_end)
    else:
        # Steps of 0.5 from kappa_end, skipping at once those above every z-score (they select
        # nothing: a kappa_end of 1e12 must not take 2e12 steps to get there).
        top = float(z_end.max()) if z_end.numel() else kappa_end
        top = top if math.isfinite(top) else kappa_end
        kappa = kappa_end - 0.5 * max(0, math.ceil((kappa_end - top) / 0.5))
        end_mask = z_end >= kappa
        while _free_in_block(ctx, start_mask, end_mask) < count and not bool(end_mask.all()):
            kappa -= 0.5
            end_mask = z_end >= kappa
        end_p = end_mask.to(t.dtype)

    def propose(n: int, generator: torch.Generator) -> torch.Tensor:
        starts = multinomial_with_replacement(start_p, n, generator)
        ends = multinomial_with_replacement(end_p, n, generator)
        if ctx.kernel_positions > 1:  # a convolution: a uniform kernel position in the start channel
            starts = starts * ctx.kernel_positions + torch.randint(0, ctx.kernel_positions, (n,), generator=generator)
        return ends * ctx.n_in + starts

    return propose


def grown_share_at_top_decile(ctx: GrowContext, new_keys: torch.Tensor) -> float:
    """Share of new connections whose start (input) node is in the top decile of strength.

    Random growth gives ≈0.1; synthesis should give far more. NaN when nothing was grown."""
    if new_keys.numel() == 0:
        return float("nan")
    s = input_strength(ctx).float()  # quantile() takes float32/64 only (half-precision models)
    threshold = torch.quantile(s, 0.9)
    return float((s[new_keys % ctx.n_in // ctx.kernel_positions] >= threshold).float().mean())

