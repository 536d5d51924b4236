"""The rewiring engine: prune, then grow, every sparse layer of a model, keeping the optimizer
in step.

Typical use, after each epoch (or every N optimizer steps)::

    rewirer = Rewirer(model, optimizer, prune="set", grow="synthesis", zeta=0.3)
    ...
    reports = rewirer.step()                      # or step(batch=(x, y)) for grow="gradient"

With ``compress_to`` the budget shrinks along a cubic schedule: each step grows fewer
connections than it prunes (DESIGN §2.4).

The Rewirer never calls ``optimizer.step()``; training stays in the user's loop.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from synthprune.compression import COMPRESS_SCOPES, LayerShape, final_counts
from synthprune.layers import SparseLayer
from synthprune.models import sparse_layers
from synthprune.schedules import CompressionPlan, RewireSchedule, ZetaSchedule
from synthprune.strategies import (
    GrowContext,
    get_grow_strategy,
    get_prune,
)
from synthprune.topology import TopologyError, check_topology, place_growth, select_lowest

__all__ = ["NEW_WEIGHTS", "LayerReport", "Rewirer"]

logger = logging.getLogger(__name__)

NEW_WEIGHTS = ("zero", "normal")
_REQUIRED = object()  # Rewirer's optimizer argument when not given at all (None is a choice)


@dataclass
class LayerReport:
    """What one rewiring step did to one layer (one line of ``topology.jsonl``)."""

    step: int
    layer: str
    zeta: float
    target: int  # connections this step aims at (below the previous count while compressing)
    pruned: int
    grown: int
    fallbacks: int  # grown connections that came from the uniform fallback
    connections: int
    density: float
    seconds: float
    diagnostics: dict[str, float] = field(default_factory=dict)  # the grow strategy's own figures

    @property
    def top_decile_share(self) -> float:
        """The built-in strategies' diagnostic (NaN for a strategy that does not report it)."""
        return self.diagnostics.get("top_decile_share", float("nan"))

    def as_dict(self) -> dict:
        """One flat record: the fields, then the strategy's diagnostics."""
        record = asdict(self)
        return {**{k: v for k, v in record.items() if k != "diagnostics"}, **self.diagnostics}


class Rewirer:
    """Prunes and regrows the connections of every sparse layer in ``model``
    (:class:`~synthprune.layers.SparseLinear`, :class:`~synthprune.conv.SparseConv2d`, ...).

    Args:
        model: a module holding sparse layers (:class:`SparseMLP`, :func:`sparsify`), or a
            ``DistributedDataParallel`` around one (rewire it with
            :func:`synthprune.distributed.rewire_ddp`, which rebuilds the wrapper).
        optimizer: the optimizer that trains it, whose per-parameter state (momentum, Adam
            moments) is moved with surviving connections and zeroed for new ones. Required:
            pass ``None`` explicitly only when nothing trains the model.
        schedule: when :meth:`maybe_step` rewires, e.g. ``RewireSchedule(every=100,
            until=5000)`` in optimizer steps (RigL's ΔT and T_end); ``None``: call
            :meth:`step` yourself.
        prune: prune criterion (``list_strategies()["prune"]``).
        grow: grow strategy (``list_strategies()["grow"]``); ``"none"`` keeps the wiring static.
        zeta: fraction of each layer's connections rewired per step, in (0, 1).
        zeta_schedule: ``"constant"`` or ``"cosine"`` (needs ``total_steps``).
        total_steps: number of rewiring steps planned (for the cosine schedule).
        seed: seeds one ``torch.Generator`` per layer; rewiring is reproducible from it.
        new_weights: ``"zero"`` (new connections start at 0) or ``"normal"`` (N(0, std²)).
        new_weight_std: the std for ``new_weights="normal"``.
        grace_steps: a connection grown at rewiring step s cannot be pruned at steps s+1 ..
            s+grace_steps (our extension: time for a new connection to prove itself). Counts
            stay exact; a step prunes fewer when too many connections are young.
        loss_fn: loss for gradient-based growth, ``loss_fn(model(x), y)``; cross-entropy.
        max_rounds: proposal rounds before growth falls back to uniform over free slots.
        compress_to: shrink to this final density (< 1), connection count (>= 1), or per-layer
            ``{name: density or count}`` (see :mod:`synthprune.compression`). ``None``: the
            budget stays constant. Infeasible targets raise ``ValueError`` here.
        compress_scope: ``"global"`` (one total over all sparse layers) or ``"layer"``.
        compress_start_step, compress_end_step: first and last *rewiring step* (0-based,
            inclusive) of the cubic schedule (:class:`~synthprune.schedules.CompressionPlan`);
            the end defaults to ``total_steps - 1``. ``compress_start`` / ``compress_end`` are
            the older spelling. (The config's ``compress_start``/``compress_end`` are *epochs*:
            epoch e's rewiring step is e - 1.) A step called with ``compress=False`` (an
            accuracy guard) holds the count and does not advance the schedule, so a paused run
            reaches the target later.
        state: a :meth:`state_dict` to continue from, for a model whose state dict (and so its
            wiring, compressed or not) was restored first; the same as calling
            :meth:`load_state_dict` after construction, except that a compression plan is taken
            from the state rather than planned from the model's current counts.
        **strategy_options: options of the grow strategy (e.g. ``endpoint="tail"`` for
            synthesis; :func:`synthprune.strategies.grow_options` lists them).

    Topology decisions run on the CPU with the per-layer generators, so the same seed gives
    the same wiring on either backend and on any device.

    While compressing, pruning never takes the last input of an output neuron that is live
    (that has outgoing connections in the next layer, or is an output of the network): each
    such neuron keeps its strongest input by the prune criterion.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | object | None = _REQUIRED,
        *,
        schedule: RewireSchedule | None = None,
        prune: str = "set",
        grow: str = "synthesis",
        zeta: float = 0.3,
        zeta_schedule: str = "constant",
        total_steps: int | None = None,
        seed: int = 0,
        new_weights: str = "zero",
        new_weight_std: float = 0.01,
        grace_steps: int = 0,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        max_rounds: int = 8,
        compress_to: float | int | str | dict | None = None,
        compress_scope: str = "global",
        compress_start_step: int | None = None,
        compress_end_step: int | None = None,
        compress_start: int | None = None,
        compress_end: int | None = None,
        state: dict | None = None,
        **strategy_options,
    ) -> None:
        self.prune_fn, self.strategy = get_prune(prune), get_grow_strategy(grow)
        self.grow_fn = self.strategy.fn
        valid_options = self.strategy.options
        unknown = set(strategy_options) - set(valid_options)
        if unknown:
            raise ValueError(f"unknown option(s) {sorted(unknown)} for grow={grow!r}; "
                             f"valid: {sorted(valid_options) or 'none'}")
        if total_steps is None and schedule is not None and schedule.until is not None:
            total_steps = max(1, schedule.count(schedule.until))  # for a cosine ζ over the rewiring window
        self.schedule = ZetaSchedule(zeta, zeta_schedule, total_steps)
        if new_weights not in NEW_WEIGHTS:
            raise ValueError(f"unknown new_weights {new_weights!r}; valid: {', '.join(NEW_WEIGHTS)}")
        if not (isinstance(grace_steps, int) and grace_steps >= 0):
            raise ValueError(f"grace_steps must be a whole number >= 0, got {grace_steps!r}")
        if max_rounds < 0:
            raise ValueError(f"max_rounds must be >= 0, got {max_rounds}")
        model = getattr(model, "module", model) if _is_ddp(model) else model
        self.layers: list[tuple[str, SparseLayer]] = sparse_layers(model)
        if not self.layers:
            raise ValueError("model has no sparse layers: build it with SparseMLP or sparsify()")
        if optimizer is _REQUIRED:
            raise ValueError("Rewirer needs the optimizer that trains the model, Rewirer(model, optimizer, ...): "
                             "its momentum must follow the rewiring; pass optimizer=None only if nothing trains it")
        _check_optimizer(optimizer, self.layers)
        self.rewire_schedule = schedule
        self.model, self.optimizer = model, optimizer
        self.prune, self.grow, self.seed = prune, grow, seed
        self.new_weights, self.new_weight_std = new_weights, new_weight_std
        self.loss_fn = loss_fn or F.cross_entropy
        self.max_rounds = max_rounds
        self.grace_steps = grace_steps
        # Per layer, the rewiring step each connection was grown at (key order); None: all old.
        self._born: list[torch.Tensor | None] = [None] * len(self.layers)
        self.strategy_options = strategy_options
        self.step_count = 0
        self._set_up_compression(compress_to, compress_scope, _one_of("compress_start", compress_start_step,
                                                                      compress_start, default=0),
                                 _one_of("compress_end", compress_end_step, compress_end, default=None),
                                 (state or {}).get("compression"))
        # One independent stream per layer (SeedSequence spawning): adding a layer or a
        # strategy that draws more numbers in one layer never shifts another layer's stream.
        states = np.random.SeedSequence(seed).spawn(len(self.layers))
        self.generators = [
            torch.Generator().manual_seed(int(s.generate_state(1, np.uint64)[0] >> np.uint64(1)))
            for s in states
        ]
        if state is not None:
            self.load_state_dict(state)

    def __repr__(self) -> str:
        opts = "".join(f", {k}={v!r}" for k, v in self.strategy_options.items())
        if self.compressing:
            opts += (f", compress_to={self.compress_to!r}, compress_scope={self.compress_scope!r}, "
                     f"compress_steps={self.compress_start}..{self.compress_end}")
        return (f"Rewirer(prune={self.prune!r}, grow={self.grow!r}, zeta={self.zeta}, "
                f"zeta_schedule={self.zeta_schedule!r}, layers={len(self.layers)}{opts})")

    def _set_up_compression(self, compress_to, scope: str, start: int, end: int | None,
                            saved: dict | None = None) -> None:
        self.compress_to, self.compress_scope = compress_to, scope
        self.plan: CompressionPlan | None = None
        if compress_to is None:
            return
        if scope not in COMPRESS_SCOPES:
            raise ValueError(f"unknown compress_scope {scope!r}; valid: {', '.join(COMPRESS_SCOPES)}")
        if end is None:
            if not self.total_steps:
                raise ValueError("compress_to needs compress_end_step (the last shrinking step) or total_steps")
            end = self.total_steps - 1
        self._successors = _successors(self.model, [layer for _, layer in self.layers])
        if saved is not None:  # continuing: the plan of the run this state comes from
            self.plan = CompressionPlan(list(saved["initial_counts"]), list(saved["final_counts"]), start, end)
            return
        shapes = [LayerShape(name, layer.n_in, layer.n_out, layer.nnz) for name, layer in self.layers]
        resuming = ("Resuming a compressed run? Load the rewirer's state (synthprune.load_checkpoint, or "
                    "Rewirer(..., state=saved_state)) instead of starting over")
        try:
            finals = final_counts(shapes, compress_to, scope)
        except ValueError as exc:
            raise ValueError(f"{exc}. {resuming}" if "only shrinks" in str(exc) else str(exc)) from None
        self.plan = CompressionPlan([s.count for s in shapes], finals, start, end)

    @property
    def compressing(self) -> bool:
        return self.plan is not None

    # Read-only views of the schedule and the plan, for reports, settings and tests.
    zeta = property(lambda self: self.schedule.zeta)
    zeta_schedule = property(lambda self: self.schedule.kind)
    total_steps = property(lambda self: self.schedule.total_steps)
    initial_counts = property(lambda self: self.plan.initial_counts if self.plan else self._counts())
    final_counts = property(lambda self: self.plan.final_counts if self.plan else self._counts())
    shrink_steps_done = property(lambda self: self.plan.steps_done if self.plan else 0)
    compress_start = property(lambda self: self.plan.start_step if self.plan else 0)  # a rewiring step
    compress_end = property(lambda self: self.plan.end_step if self.plan else 0)  # a rewiring step

    def _counts(self) -> list[int]:
        return [layer.nnz for _, layer in self.layers]

    def current_zeta(self) -> float:
        return self.schedule.at(self.step_count)

    def targets(self, compress: bool = True) -> list[int] | None:
        """Each layer's connection count after the next step, or ``None`` for "keep the current
        count" (no compression, before the plan's first step, or ``compress=False``)."""
        if self.plan is None or not compress:
            return None
        return self.plan.targets(self.step_count)

    @torch.no_grad()
    def step(
        self, batch: tuple[torch.Tensor, torch.Tensor] | None = None, *, compress: bool = True
    ) -> list[LayerReport]:
        """Rewire every sparse layer once; returns one :class:`LayerReport` per layer.

        ``batch=(inputs, targets)`` is required by gradient-based growth and ignored otherwise.
        ``compress=False`` holds every layer's count this step (an accuracy guard's pause).
        """
        if self.strategy.needs_gradient and batch is None:
            raise ValueError(f"grow={self.grow!r} needs a batch: call step(batch=(inputs, targets))")
        signals = self._layer_signals(batch) if self.strategy.needs_gradient else {}
        zeta = self.current_zeta()
        shrinking = self.targets(compress)
        targets = shrinking or [layer.nnz for _, layer in self.layers]
        regrowing = [f"{name} ({layer.nnz} -> {target})"
                     for (name, layer), target in zip(self.layers, targets, strict=True) if target > layer.nnz]
        if regrowing:  # compression never grows: the plan is another wiring's
            raise ValueError(f"this compression step would regrow {', '.join(regrowing)}: the model's wiring was "
                             "replaced (a state dict loaded?) without the rewirer's state. Restore both together "
                             "(synthprune.load_checkpoint, or rewirer.load_state_dict after the model's)")
        reports: list[LayerReport] = []
        # Last layer first: which of a layer's output neurons are live depends on the next
        # layer's final wiring for this step.
        for index in reversed(range(len(self.layers))):
            name, layer = self.layers[index]
            start = time.perf_counter()
            live = self._live_outputs(index)
            pruned, grown, fallbacks, diagnostics = self._rewire_layer(
                index, layer, zeta, targets[index], self.generators[index], signals.get(name), live)
            report = LayerReport(
                step=self.step_count, layer=name, zeta=zeta, target=targets[index], pruned=pruned, grown=grown,
                fallbacks=fallbacks, connections=layer.nnz, density=layer.density,
                seconds=time.perf_counter() - start, diagnostics=diagnostics,
            )
            logger.info("rewire step %d %s: -%d +%d (fallback %d) -> %d (%.2f%%) in %.3fs %s", report.step, name,
                        pruned, grown, fallbacks, report.connections, 100 * report.density, report.seconds,
                        diagnostics)
            reports.insert(0, report)
        if shrinking is not None:
            self.plan.advance()
        self.step_count += 1
        return reports

    def _live_outputs(self, index: int) -> torch.Tensor | None:
        """``[n_out]`` bool: output neurons of layer ``index`` whose last input must survive
        (only while compressing; ``None`` = no protection)."""
        if not self.compressing:
            return None
        layer = self.layers[index][1]
        successor = self._successors[index]
        if not isinstance(successor, SparseLayer):  # dense next layer, or a network output
            return torch.ones(layer.n_out, dtype=torch.bool)
        return successor.input_node_degree() > 0

    def _rewire_layer(
        self,
        index: int,
        layer: SparseLayer,
        zeta: float,
        target: int,
        generator: torch.Generator,
        signal: tuple | None,
        live_outputs: torch.Tensor | None,
    ) -> tuple[int, int, int, dict[str, float]]:
        n_in, n_out = layer.n_in, layer.n_out
        keys = layer.keys().cpu()
        values = layer.connection_values().detach().cpu()
        scores = self.prune_fn(values)
        last_inputs = _last_inputs(keys // n_in, scores, live_outputs)
        born = self._born[index]
        if born is None or born.numel() != keys.numel():  # never tracked, or rewired elsewhere: all old
            born = torch.full((keys.numel(),), -(2**62), dtype=torch.long)
        young = (self.step_count - born <= self.grace_steps) if self.grace_steps else None
        protected = last_inputs if young is None else young if last_inputs is None else last_inputs | young
        n_protected = int(protected.sum()) if protected is not None else 0
        # Prune ζ·k (none when static), at least enough to reach the target, and never a
        # protected connection; grow back the difference to the target.
        n_prune = 0 if self.strategy.static else round(zeta * keys.numel())
        n_prune = min(max(n_prune, keys.numel() - target), keys.numel() - n_protected)
        n_grow = target - (keys.numel() - n_prune)

        # 1. prune: the shared selection removes the lowest scores of the criterion
        keep = torch.ones(keys.numel(), dtype=torch.bool)
        keep[select_lowest(scores, n_prune, protected)] = False
        kept_old = keep.nonzero().squeeze(1)
        ctx = GrowContext(n_in, n_out, keys[keep], values[keep], *(signal or (None, None, None)),
                          kernel_positions=layer.kernel_positions)

        # 2. grow: the strategy proposes, the shared primitive places exactly n_grow
        proposer = self.grow_fn(ctx, n_grow, **self.strategy_options)
        new_keys, fallbacks = place_growth(ctx.keys, n_in * n_out, n_grow, proposer, generator, self.max_rounds)

        # 3. merge into sorted (CSR) order and remember where survivors moved
        merged = torch.cat([ctx.keys, new_keys])
        order = torch.argsort(merged)
        position = torch.empty_like(order)
        position[order] = torch.arange(order.numel())
        kept_new = position[: ctx.keys.numel()]
        merged_values = torch.cat([ctx.values, self._new_values(n_grow, values.dtype, generator)])
        if self.grace_steps:
            self._born[index] = torch.cat([born[keep], torch.full((n_grow,), self.step_count)])[order]

        # 4. swap the topology in, carrying optimizer state for survivors only
        param = layer.connection_parameter()
        old_state = self._param_state(param)
        layer.set_connections(merged[order], merged_values[order])
        param.grad = None  # a gradient of the old topology means nothing for the new one
        for key, tensor in old_state.items():
            self.optimizer.state[param][key] = layer.carry_over(tensor, kept_old, kept_new)

        check_topology(layer.keys().cpu(), n_out, n_in, expected_count=target)
        if last_inputs is not None:
            _check_kept_inputs(layer, keys[last_inputs] // n_in)
        layer.check()
        diagnostics = self.strategy.diagnostics(ctx, new_keys) if self.strategy.diagnostics else {}
        return n_prune, n_grow, fallbacks, diagnostics

    def _new_values(self, count: int, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
        if self.new_weights == "zero":
            return torch.zeros(count, dtype=dtype)
        return torch.randn(count, generator=generator, dtype=dtype) * self.new_weight_std

    def _param_state(self, param: nn.Parameter) -> dict[str, torch.Tensor]:
        """The optimizer's parameter-shaped state tensors for ``param`` (momentum, moments)."""
        if self.optimizer is None or param not in self.optimizer.state:
            return {}
        state = {}
        for key, value in self.optimizer.state[param].items():
            if not torch.is_tensor(value) or value.numel() <= 1:
                continue  # scalars such as Adam's step count carry over untouched
            if value.shape != param.shape:
                raise ValueError(f"optimizer state {key!r} has shape {tuple(value.shape)}, not the "
                                 f"parameter's {tuple(param.shape)}: this optimizer cannot be rewired")
            state[key] = value
        return state

    def _layer_signals(self, batch) -> dict[str, tuple]:
        """For gradient-based growth, per sparse layer: ``(inputs [B, n_in], grad_outputs
        [B, n_out], None)`` for a linear layer (RigL's dense gradient is formed from them in
        bounded chunks by :func:`~synthprune.topology.top_gradient_slots`), or ``(None, None,
        gradient [n_out, n_in])`` for a convolution. ``batch`` is ``(inputs, targets)`` or a
        list of them: gradients are then summed over the batches (RigL's accumulation).
        Parameter ``.grad`` fields are not touched."""
        single = isinstance(batch, (tuple, list)) and len(batch) == 2 and all(map(torch.is_tensor, batch))
        batches = [batch] if single else list(batch)
        if not batches:
            raise ValueError("gradient growth needs at least one batch")
        parts = [self._one_batch_signals(*b) for b in batches]
        signals = {}
        for name, layer in self.layers:
            pieces = [p[name] for p in parts if name in p]
            if not pieces:
                continue
            dense = [layer.weight_gradient(x, g) for x, g in pieces]
            if dense[0] is not None:  # the layer forms its dense gradient (a convolution)
                signals[name] = (None, None, sum(dense))
                continue
            # A linear layer: every leading dimension is a row; the grower forms the gradient in chunks.
            signals[name] = (torch.cat([x.reshape(-1, x.shape[-1]) for x, _ in pieces]),
                             torch.cat([g.reshape(-1, g.shape[-1]) for _, g in pieces]), None)
        return signals

    def _one_batch_signals(self, inputs: torch.Tensor, targets: torch.Tensor) -> dict[str, tuple]:
        """Each sparse layer's input and the loss gradient w.r.t. its output on one batch."""
        captured: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        hooks = [
            layer.register_forward_hook(lambda m, args, out, name=name: captured.__setitem__(name, (args[0], out)))
            for name, layer in self.layers
        ]
        try:
            with torch.enable_grad():
                loss = self.loss_fn(self.model(inputs), targets)
                names = [name for name, _ in self.layers if name in captured]
                grads = torch.autograd.grad(loss, [captured[n][1] for n in names], allow_unused=True)
        finally:
            for hook in hooks:
                hook.remove()
        signals = {}
        for name, grad in zip(names, grads, strict=True):
            x, out = captured[name]
            signals[name] = (x.detach(), torch.zeros_like(out) if grad is None else grad)
        return signals

    def maybe_step(self, step: int, batch=None, *, compress: bool = True) -> list[LayerReport] | None:
        """Rewire if the :class:`~synthprune.schedules.RewireSchedule` says optimizer step
        ``step`` (the number of optimizer steps done, counted from 1) is due; returns the
        reports, or ``None`` when nothing was done."""
        if self.rewire_schedule is None:
            raise ValueError("maybe_step needs a schedule: Rewirer(..., schedule=RewireSchedule(every=N))")
        if not self.rewire_schedule.due(step):
            return None
        return self.step(batch=batch, compress=compress)

    def state_dict(self) -> dict:
        """Step count, per-layer generator states and the settings (plain tensors/containers,
        loadable with ``torch.load(weights_only=True)``)."""
        return {
            "step_count": self.step_count,
            "generators": [g.get_state() for g in self.generators],
            "settings": self._settings(),
            "compression": self.plan.state_dict() if self.plan else
            {"initial_counts": self._counts(), "final_counts": self._counts(), "shrink_steps_done": 0},
            "wiring": self._wiring(),
            **({"born": [b if b is not None else torch.empty(0, dtype=torch.long) for b in self._born]}
               if self.grace_steps else {}),
        }

    def _wiring(self) -> list[dict]:
        """Per layer, the count and a digest of the keys: what the state belongs to."""
        return [{"layer": name, "connections": layer.nnz, "digest": _keys_digest(layer.keys())}
                for name, layer in self.layers]

    def _settings(self) -> dict:
        return {"prune": self.prune, "grow": self.grow, "zeta": self.zeta, "zeta_schedule": self.zeta_schedule,
                "seed": self.seed, "grace_steps": self.grace_steps, "compress_to": self.compress_to,
                "compress_scope": self.compress_scope, "compress_start": self.compress_start,
                "compress_end": self.compress_end}

    def load_state_dict(self, state: dict) -> None:
        settings = self._settings()
        differ = {k: (v, settings[k]) for k, v in state.get("settings", {}).items() if settings.get(k) != v}
        if differ:
            raise ValueError(f"rewirer state was saved with other settings (saved, current): {differ}")
        if len(state["generators"]) != len(self.generators):
            raise ValueError(f"rewirer state has {len(state['generators'])} layers, model has {len(self.generators)}")
        saved_wiring = state.get("wiring")  # absent in states saved before 0.2
        if saved_wiring is not None:
            differ = [f"{now['layer']} (has {now['connections']} connections, the state was saved with "
                      f"{then['connections']})" if now["connections"] != then["connections"] else
                      f"{now['layer']} (same count, other connections)"
                      for now, then in zip(self._wiring(), saved_wiring, strict=False) if now != then]
            if differ:
                raise ValueError(f"the model's wiring does not match this rewirer state: {', '.join(differ)}. Load "
                                 "the model's state dict saved with it first (synthprune.load_checkpoint restores "
                                 "model, optimizer and rewirer together, in that order)")
        for generator, g_state in zip(self.generators, state["generators"], strict=True):
            generator.set_state(g_state)
        self.step_count = int(state["step_count"])
        if self.grace_steps and "born" in state:
            self._born = [b.long() if b.numel() else None for b in state["born"]]
        if "compression" in state and self.plan is not None:
            # The counts compression started from, not those of the model as (re)built.
            self.plan.load_state_dict(state["compression"])


def _keys_digest(keys: torch.Tensor) -> str:
    return hashlib.blake2b(keys.detach().cpu().numpy().tobytes(), digest_size=8).hexdigest()


def _one_of(name: str, step_spelling: int | None, old_spelling: int | None, default: int | None) -> int | None:
    """``compress_start_step`` and its older spelling ``compress_start`` (the same thing)."""
    if step_spelling is not None and old_spelling is not None and step_spelling != old_spelling:
        raise ValueError(f"give {name}_step or {name} (its older spelling), not both")
    return step_spelling if step_spelling is not None else old_spelling if old_spelling is not None else default


def _check_optimizer(optimizer: torch.optim.Optimizer | None, layers: list[tuple[str, SparseLayer]]) -> None:
    """The optimizer must hold every sparse layer's connection Parameter: its state (momentum,
    Adam moments) is carried to the new wiring at each step. Another model's optimizer would
    keep training the old tensors."""
    if optimizer is None:  # said explicitly: nothing trains the model
        return
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    missing = [name for name, layer in layers if id(layer.connection_parameter()) not in held]
    if missing:
        raise ValueError(f"the optimizer does not hold the connection weights of {', '.join(missing)}: build it "
                         "from this model's parameters (torch.optim.SGD(model.parameters(), ...)) before the Rewirer")


def _successors(model: nn.Module, layers: list[SparseLayer]) -> list[nn.Module | None]:
    """The weight layer fed by each sparse layer, when the model is a plain sequence of layers
    (:class:`SparseMLP`, an ``nn.Sequential`` CNN) and the next layer's input nodes are this
    layer's outputs one to one (features, or channels); ``None`` (every output neuron counts
    as live) otherwise or for the last one."""
    if not isinstance(model, nn.Sequential):
        return [None] * len(layers)
    chain = [m for m in model.modules() if isinstance(m, (SparseLayer, nn.Linear, nn.Conv1d, nn.Conv2d))]
    successors: list[nn.Module | None] = []
    for layer in layers:
        position = next(i for i, m in enumerate(chain) if m is layer)
        after = chain[position + 1] if position + 1 < len(chain) else None
        successors.append(after if after is not None and _input_nodes(after) == layer.n_out else None)
    return successors


def _input_nodes(module: nn.Module) -> int | None:
    """Input features or channels of a weight layer (``None`` for grouped convolutions)."""
    if isinstance(module, SparseLayer):
        return module.input_nodes if getattr(module, "groups", 1) == 1 else None
    if isinstance(module, nn.Linear):
        return module.in_features
    return module.in_channels if module.groups == 1 else None


def _is_ddp(model: nn.Module) -> bool:
    return isinstance(model, nn.parallel.DistributedDataParallel)


def _last_inputs(rows: torch.Tensor, scores: torch.Tensor, live_outputs: torch.Tensor | None) -> torch.Tensor | None:
    """``[nnz]`` bool: for each live output neuron (row), its one connection with the highest
    prune score -- the last to go -- which pruning must keep. ``rows`` is sorted (CSR order)."""
    if live_outputs is None:
        return None
    if rows.numel() == 0:
        return torch.zeros(0, dtype=torch.bool)
    best = torch.full((live_outputs.numel(),), -torch.inf, dtype=scores.dtype)
    best = best.scatter_reduce(0, rows, scores, reduce="amax")
    candidates = ((scores == best[rows]) & live_outputs[rows]).nonzero().squeeze(1)
    first_of_row = torch.ones(candidates.numel(), dtype=torch.bool)
    first_of_row[1:] = rows[candidates[1:]] != rows[candidates[:-1]]
    protected = torch.zeros(rows.numel(), dtype=torch.bool)
    protected[candidates[first_of_row]] = True
    return protected


def _check_kept_inputs(layer: SparseLayer, rows: torch.Tensor) -> None:
    """Every protected output neuron (``rows``) still has an input after the step."""
    in_degree = torch.bincount(layer.edge_index()[0].cpu(), minlength=layer.n_out)
    orphaned = rows[in_degree[rows] == 0]
    if orphaned.numel():
        raise TopologyError(f"live output neurons {orphaned[:5].tolist()} lost their last input")
