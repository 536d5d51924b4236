"""Dynamic sparse training inside Lightning: the :class:`Rewiring` callback.

    import lightning as L
    from synthprune.lightning import Rewiring

    trainer = L.Trainer(max_epochs=20, callbacks=[Rewiring(grow="synthesis", every=200)])
    trainer.fit(module)                    # module holds sparse layers (SparseMLP, sparsify(...))
    trainer.fit(module, ckpt_path="last.ckpt")   # resumes the wiring's schedule and random draws too

Needs the optional extra: ``pip install 'synthprune[lightning]'``. Tested on one process. Under
Lightning's DDP strategy use ``backend="masked"`` layers: their tensors keep their shape when
the wiring changes, whereas a compressing csr layer swaps in a resized tensor that Lightning's
DDP wrapper holds (in your own loop, :func:`synthprune.rewire_ddp` rebuilds the wrapper).

The callback builds its :class:`~synthprune.rewiring.Rewirer` in ``on_fit_start``, once the
optimizer exists (``configure_optimizers`` runs after a module's ``on_load_checkpoint``, so a
module cannot do it itself without stashing state by hand). It rewires after every ``every``
optimizer steps (``trainer.global_step``), or after each epoch but the last when ``every`` is
``None``, logs each step's connections, and keeps its state in Lightning checkpoints through
``state_dict``/``load_state_dict``: on ``ckpt_path=`` resume Lightning restores the module (its
wiring included) before the callback's state, and the Rewirer is then built from that state.
"""

from __future__ import annotations

from collections.abc import Callable

try:
    from lightning.pytorch.callbacks import Callback
except ImportError as exc:  # the optional extra
    raise ImportError("synthprune.lightning needs Lightning: pip install 'synthprune[lightning]'") from exc

from synthprune.rewiring import LayerReport, Rewirer
from synthprune.schedules import RewireSchedule

__all__ = ["Rewiring"]


class Rewiring(Callback):
    """Rewire the sparse layers of the ``LightningModule`` during ``trainer.fit``.

    Args:
        prune, grow, zeta, zeta_schedule, seed, compress_to, ...: as for
            :class:`~synthprune.rewiring.Rewirer` (``**rewirer_options``). Compression steps
            (``compress_start_step``/``compress_end_step``) count rewiring steps from 0; the
            end defaults to the last rewiring step of the fit.
        every: rewire after every N optimizer steps; ``None``: after each epoch but the last.
        until: no rewiring at or after this optimizer step (RigL's ``T_end``).
        loss_fn: ``loss_fn(module(x), y)`` for gradient growth (default cross-entropy) on the
            batch that ended the step; a batch must be ``(inputs, targets)``.
        optimizer_index: which of ``trainer.optimizers`` trains the sparse layers.

    After each rewiring step it logs ``rewiring/connections`` (all sparse layers) and
    ``rewiring/<layer>`` (each layer's count); ``reports`` keeps every
    :class:`~synthprune.rewiring.LayerReport`.
    """

    def __init__(self, prune: str = "set", grow: str = "synthesis", *, every: int | None = None,
                 until: int | None = None, loss_fn: Callable | None = None, optimizer_index: int = 0,
                 **rewirer_options) -> None:
        super().__init__()
        self.schedule = RewireSchedule(every, until) if every is not None else None
        self.until = until
        self.options = {"prune": prune, "grow": grow, "loss_fn": loss_fn, **rewirer_options}
        self.optimizer_index = optimizer_index
        self.rewirer: Rewirer | None = None
        self.reports: list[LayerReport] = []
        self._saved: dict | None = None  # state loaded before the optimizer existed
        self._last_batch = None
        self._done_step = -1  # the optimizer step last rewired after (gradient accumulation repeats it)

    # ---- the rewirer, once the optimizer exists ------------------------------------------------

    def on_fit_start(self, trainer, pl_module) -> None:
        optimizers = trainer.optimizers
        if len(optimizers) <= self.optimizer_index:
            raise ValueError(f"Rewiring(optimizer_index={self.optimizer_index}): configure_optimizers returned "
                             f"{len(optimizers)} optimizer(s)")
        options = dict(self.options)
        options.setdefault("total_steps", max(1, self._planned_steps(trainer)))
        if options.get("compress_to") is not None:
            options.setdefault("compress_end_step", options["total_steps"] - 1)
        self.rewirer = Rewirer(pl_module, optimizers[self.optimizer_index], schedule=self.schedule,
                               state=self._saved, **options)
        self._saved = None

    def _planned_steps(self, trainer) -> int:
        """Rewiring steps this fit will make (for the cosine ζ and the compression end)."""
        if self.schedule is not None:
            total = trainer.estimated_stepping_batches
            return self.schedule.count(int(total) - 1) if total != float("inf") else 0
        epochs = trainer.max_epochs if trainer.max_epochs is not None and trainer.max_epochs > 0 else 1
        batches = trainer.num_training_batches
        if self.until is not None and batches != float("inf"):
            return sum(1 for e in range(1, epochs) if e * batches < self.until)
        return epochs - 1

    # ---- when to rewire --------------------------------------------------------------------

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.schedule is None:
            self._last_batch = batch if self.rewirer.strategy.needs_gradient else None
            return
        step = trainer.global_step
        last = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else trainer.estimated_stepping_batches
        if step < last and self.schedule.due(step) and self._stepped(trainer, step):
            self._rewire(pl_module, batch)

    def _stepped(self, trainer, step: int) -> bool:
        """Whether this batch ended an optimizer step (not mid-accumulation) new to the callback."""
        if self._done_step == step:
            return False
        self._done_step = step
        return True

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.schedule is not None or trainer.current_epoch >= (trainer.max_epochs or 1) - 1:
            return  # step-based, or the last epoch: no rewiring after it
        if self.until is not None and trainer.global_step >= self.until:
            return
        self._rewire(pl_module, self._last_batch)

    def _rewire(self, pl_module, batch) -> None:
        if self.rewirer.strategy.needs_gradient:
            batch = tuple(batch[:2]) if batch is not None else None
            if batch is None:
                raise ValueError("Rewiring(grow='gradient') needs (inputs, targets) batches")
            device = next(pl_module.parameters()).device
            batch = tuple(t.to(device) for t in batch)
        reports = self.rewirer.step(batch=batch)
        self.reports += reports
        pl_module.log("rewiring/connections", float(sum(r.connections for r in reports)))
        for report in reports:
            pl_module.log(f"rewiring/{report.layer}", float(report.connections))

    # ---- checkpoints ----------------------------------------------------------------------------

    def state_dict(self) -> dict:
        if self.rewirer is not None:
            return self.rewirer.state_dict()
        return dict(self._saved or {})

    def load_state_dict(self, state_dict: dict) -> None:
        if not state_dict:
            return
        if self.rewirer is None:  # Lightning restores callbacks before the optimizers exist
            self._saved = state_dict
        else:
            self.rewirer.load_state_dict(state_dict)

