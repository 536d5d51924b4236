"""The rewiring engine: prune, then grow, every sparse layer of a model, keeping the optimizer
in step.

Typical use, after each epoch (or every N optimizer steps)::

    rewirer = Rewirer(model, optimizer, prune="set", grow="synthesis", zeta=0.3)
    ...
    reports = rewirer.step()                      # or step(batch=(x, y)) for grow="gradient"

The Rewirer never calls ``optimizer.step()``; training stays in the user's loop.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from synthprune.layers import SparseLinear
from synthprune.models import sparse_layers
from synthprune.schedules import ZETA_SCHEDULES, zeta_at
from synthprune.strategies import (
    GrowContext,
    get_grow,
    get_prune,
    grow_options,
    grown_share_at_top_decile,
    needs_gradient,
)
from synthprune.topology import check_topology, place_growth, select_lowest

__all__ = ["NEW_WEIGHTS", "LayerReport", "Rewirer"]

logger = logging.getLogger(__name__)

NEW_WEIGHTS = ("zero", "normal")


@dataclass
class LayerReport:
    """What one rewiring step did to one layer (one line of ``topology.jsonl``)."""

    step: int
    layer: str
    zeta: float
    pruned: int
    grown: int
    fallbacks: int  # grown connections that came from the uniform fallback
    top_decile_share: float  # share of grown connections starting at top-decile-strength inputs
    connections: int
    density: float
    seconds: float

    def as_dict(self) -> dict:
        return asdict(self)


class Rewirer:
    """Prunes and regrows the connections of every :class:`SparseLinear` in ``model``.

    Args:
        model: a module holding SparseLinear layers (:class:`SparseMLP`, :func:`sparsify`).
        optimizer: its optimizer, whose per-parameter state (momentum, Adam moments) is moved
            with surviving connections and zeroed for new ones. ``None`` if there is none.
        prune: prune criterion (``list_strategies()["prune"]``).
        grow: grow strategy (``list_strategies()["grow"]``); ``"none"`` keeps the wiring static.
        zeta: fraction of each layer's connections rewired per step, in (0, 1).
        zeta_schedule: ``"constant"`` or ``"cosine"`` (needs ``total_steps``).
        total_steps: number of rewiring steps planned (for the cosine schedule).
        seed: seeds one ``torch.Generator`` per layer; rewiring is reproducible from it.
        new_weights: ``"zero"`` (new connections start at 0) or ``"normal"`` (N(0, std²)).
        new_weight_std: the std for ``new_weights="normal"``.
        loss_fn: loss for gradient-based growth, ``loss_fn(model(x), y)``; cross-entropy.
        max_rounds: proposal rounds before growth falls back to uniform over free slots.
        **strategy_options: options of the grow strategy (e.g. ``endpoint="tail"`` for
            synthesis; :func:`synthprune.strategies.grow_options` lists them).

    Topology decisions run on the CPU with the per-layer generators, so the same seed gives
    the same wiring on either backend and on any device.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        prune: str = "set",
        grow: str = "synthesis",
        zeta: float = 0.3,
        zeta_schedule: str = "constant",
        total_steps: int | None = None,
        seed: int = 0,
        new_weights: str = "zero",
        new_weight_std: float = 0.01,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        max_rounds: int = 8,
        **strategy_options,
    ) -> None:
        self.prune_fn, self.grow_fn = get_prune(prune), get_grow(grow)
        valid_options = grow_options(grow)
        unknown = set(strategy_options) - set(valid_options)
        if unknown:
            raise ValueError(f"unknown option(s) {sorted(unknown)} for grow={grow!r}; "
                             f"valid: {sorted(valid_options) or 'none'}")
        if not 0 < zeta < 1:
            raise ValueError(f"zeta must be in (0, 1), got {zeta!r}")
        if zeta_schedule not in ZETA_SCHEDULES:
            raise ValueError(f"unknown zeta_schedule {zeta_schedule!r}; valid: {', '.join(ZETA_SCHEDULES)}")
        zeta_at(0, zeta, zeta_schedule, total_steps)  # validates total_steps for cosine
        if new_weights not in NEW_WEIGHTS:
            raise ValueError(f"unknown new_weights {new_weights!r}; valid: {', '.join(NEW_WEIGHTS)}")
        if max_rounds < 0:
            raise ValueError(f"max_rounds must be >= 0, got {max_rounds}")
        self.layers: list[tuple[str, SparseLinear]] = sparse_layers(model)
        if not self.layers:
            raise ValueError("model has no SparseLinear layers: build it with SparseMLP or sparsify()")
        self.model, self.optimizer = model, optimizer
        self.prune, self.grow, self.zeta = prune, grow, zeta
        self.zeta_schedule, self.total_steps, self.seed = zeta_schedule, total_steps, seed
        self.new_weights, self.new_weight_std = new_weights, new_weight_std
        self.loss_fn = loss_fn or F.cross_entropy
        self.max_rounds = max_rounds
        self.strategy_options = strategy_options
        self.step_count = 0
        # One independent stream per layer (SeedSequence spawning): adding a layer or a
        # strategy that draws more numbers in one layer never shifts another layer's stream.
        states = np.random.SeedSequence(seed).spawn(len(self.layers))
        self.generators = [
            torch.Generator().manual_seed(int(s.generate_state(1, np.uint64)[0] >> np.uint64(1)))
            for s in states
        ]

    def __repr__(self) -> str:
        opts = "".join(f", {k}={v!r}" for k, v in self.strategy_options.items())
        return (f"Rewirer(prune={self.prune!r}, grow={self.grow!r}, zeta={self.zeta}, "
                f"zeta_schedule={self.zeta_schedule!r}, layers={len(self.layers)}{opts})")

    def current_zeta(self) -> float:
        return zeta_at(self.step_count, self.zeta, self.zeta_schedule, self.total_steps)

    @torch.no_grad()
    def step(self, batch: tuple[torch.Tensor, torch.Tensor] | None = None) -> list[LayerReport]:
        """Rewire every sparse layer once; returns one :class:`LayerReport` per layer.

        ``batch=(inputs, targets)`` is required by gradient-based growth and ignored otherwise.
        """
        if needs_gradient(self.grow) and batch is None:
            raise ValueError(f"grow={self.grow!r} needs a batch: call step(batch=(inputs, targets))")
        signals = self._layer_signals(batch) if needs_gradient(self.grow) else {}
        zeta = self.current_zeta()
        reports = []
        for (name, layer), generator in zip(self.layers, self.generators, strict=True):
            start = time.perf_counter()
            inputs, grad_outputs = signals.get(name, (None, None))
            pruned, grown, fallbacks, share = self._rewire_layer(layer, zeta, generator, inputs, grad_outputs)
            report = LayerReport(
                step=self.step_count, layer=name, zeta=zeta, pruned=pruned, grown=grown,
                fallbacks=fallbacks, top_decile_share=share, connections=layer.nnz,
                density=layer.density, seconds=time.perf_counter() - start,
            )
            logger.info("rewire step %d %s: -%d +%d (fallback %d, top-decile starts %.0f%%) -> %d (%.2f%%) in %.3fs",
                        report.step, name, pruned, grown, fallbacks, 100 * share, report.connections,
                        100 * report.density, report.seconds)
            reports.append(report)
        self.step_count += 1
        return reports

    def _rewire_layer(
        self,
        layer: SparseLinear,
        zeta: float,
        generator: torch.Generator,
        inputs: torch.Tensor | None,
        grad_outputs: torch.Tensor | None,
    ) -> tuple[int, int, int, float]:
        n_in, n_out = layer.in_features, layer.out_features
        keys = layer.keys().cpu()
        values = layer.connection_values().detach().cpu()
        target = keys.numel()  # constant budget
        n_prune = 0 if self.grow == "none" else round(zeta * keys.numel())
        n_grow = target - (keys.numel() - n_prune)

        # 1. prune: the shared selection removes the lowest scores of the criterion
        keep = torch.ones(keys.numel(), dtype=torch.bool)
        keep[select_lowest(self.prune_fn(values), n_prune)] = False
        kept_old = keep.nonzero().squeeze(1)
        ctx = GrowContext(n_in, n_out, keys[keep], values[keep], inputs, grad_outputs)

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

        # 4. swap the topology in, carrying optimizer state for survivors only
        param = layer.connection_parameter()
        old_state = self._param_state(param)
        layer.set_connections(merged[order], merged_values[order])
        param.grad = None  # a gradient of the old topology means nothing for the new one
        for key, tensor in old_state.items():
            self.optimizer.state[param][key] = layer.carry_over(tensor, kept_old, kept_new)

        check_topology(layer.keys().cpu(), n_out, n_in, expected_count=target)
        layer.check()
        return n_prune, n_grow, fallbacks, grown_share_at_top_decile(ctx, new_keys)

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

    def _layer_signals(self, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Each sparse layer's inputs ``[B, n_in]`` and loss gradient w.r.t. its outputs
        ``[B, n_out]`` on ``batch`` -- all RigL needs for the dense weight gradient, which
        :func:`~synthprune.topology.top_gradient_slots` forms in bounded chunks. Parameter
        ``.grad`` fields are not touched."""
        inputs, targets = batch
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
            grad = torch.zeros_like(out) if grad is None else grad
            signals[name] = (x.detach().reshape(-1, x.shape[-1]), grad.reshape(-1, out.shape[-1]))
        return signals

    def state_dict(self) -> dict:
        """Step count, per-layer generator states and the settings (plain tensors/containers,
        loadable with ``torch.load(weights_only=True)``)."""
        return {
            "step_count": self.step_count,
            "generators": [g.get_state() for g in self.generators],
            "settings": {"prune": self.prune, "grow": self.grow, "zeta": self.zeta,
                         "zeta_schedule": self.zeta_schedule, "seed": self.seed},
        }

    def load_state_dict(self, state: dict) -> None:
        settings = {"prune": self.prune, "grow": self.grow, "zeta": self.zeta,
                    "zeta_schedule": self.zeta_schedule, "seed": self.seed}
        differ = {k: (v, settings[k]) for k, v in state.get("settings", {}).items() if settings.get(k) != v}
        if differ:
            raise ValueError(f"rewirer state was saved with other settings (saved, current): {differ}")
        if len(state["generators"]) != len(self.generators):
            raise ValueError(f"rewirer state has {len(state['generators'])} layers, model has {len(self.generators)}")
        for generator, g_state in zip(self.generators, state["generators"], strict=True):
            generator.set_state(g_state)
        self.step_count = int(state["step_count"])
