"""``fit()``: a short, linear training loop with rewiring, run records and resume.

config -> data + model -> per epoch: train (optimizer.step) -> evaluate -> rewire -> record ->
checkpoint. The run directory is the only output; analysis reads it afterwards.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from synthprune import distributed
from synthprune.config import ConfigError, TrainConfig, config_from_file
from synthprune.data import load_dataset
from synthprune.distributed import Ranks
from synthprune.files import FileFormatError
from synthprune.optim import sgd
from synthprune.rewiring import Rewirer
from synthprune.rundir import START_AGAIN, RunDir
from synthprune.runs import build_model, connections, live_neurons, summarize, write_final
from synthprune.schedules import RewireSchedule
from synthprune.threads import apply_default_threads
from synthprune.wiring import save_snapshot

__all__ = ["TrainingError", "build_rewirer", "fit", "split_validation"]


# Settings a resume may change without changing what the run computes.
RESUMABLE_CHANGES = ("device", "data_dir")


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss became NaN); the last checkpoint is kept."""


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000,
             ranks: Ranks = distributed.SINGLE) -> float:
    """Accuracy in [0, 1] (eval mode: no dropout); in a distributed run each rank scores its
    shard of ``x`` and the counts are summed."""
    model.eval()
    x_mine, y_mine = distributed.shard(x, ranks), distributed.shard(y, ranks)  # views, no copies
    correct = sum(int((model(x_mine[i : i + batch_size]).argmax(1) == y_mine[i : i + batch_size]).sum())
                  for i in range(0, len(y_mine), batch_size))
    return distributed.all_sum([correct], ranks, y.device)[0] / len(y)


def fit(
    config: TrainConfig,
    out: str | Path,
    *,
    resume: bool = False,
    progress: Callable[[int, int], object] | None = None,
    log: Callable[[str], None] = print,
    auto_threads: bool = False,
) -> dict:
    """Train ``config`` into the run directory ``out``; returns the summary (see :func:`synthprune.runs.summarize`).

    ``resume=True`` continues from ``out/checkpoint.pt`` with the run's saved config; the result
    equals an uninterrupted run's on the same machine. ``progress(total_batches, epoch)`` may
    return a context manager whose ``advance(loss, accuracy)`` is called per batch.
    ``auto_threads=True`` (the command line's default) sets torch's thread count from the
    model's work (:func:`synthprune.threads.suggested_threads`) unless ``OMP_NUM_THREADS`` is set.

    Under torchrun (``WORLD_SIZE`` > 1) this is data-parallel: ``config.batch_size`` is the
    global batch, each rank trains on its shard of it, and only rank 0 writes ``out`` or logs
    (see :mod:`synthprune.distributed`).
    """
    ranks = distributed.start()
    if not ranks.is_main:
        progress, log = None, lambda line: None
    error: BaseException | None = None
    run = RunDir(out)
    try:
        summary = _fit(config, run, resume, progress, log, ranks, auto_threads)
    except BaseException as exc:  # handled outside the except block, where its frames can go
        error = exc
    finally:
        run.release()  # the run directory's lock (held by rank 0 from prepare() on)
    distributed.leave(ranks, error, expected=(ValueError, OSError, TrainingError, KeyboardInterrupt))
    if error is not None:
        raise error
    return summary


@dataclass
class Splits:
    """The data on the training device: ``x_*`` ``[N, features]``, ``y_*`` ``[N]``; the
    validation split is held out of the training set (empty without one)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    n_classes: int  # the dataset's, not the labels' at hand


@dataclass
class Session:
    """What one training run holds while it runs (built by :func:`_prepare`)."""

    config: TrainConfig
    run: RunDir
    ranks: Ranks
    device: torch.device
    data: Splits
    model: nn.Module
    optimizer: torch.optim.Optimizer
    rewirer: Rewirer | None
    net: nn.Module  # what training calls: the model, or its DDP wrapper
    metrics: list[dict] = field(default_factory=list)  # one row per epoch done
    topology: list[dict] = field(default_factory=list)  # one record per rewiring step and layer
    start_epoch: int = 0


def _fit(config: TrainConfig, run: RunDir, resume: bool, progress: Callable[[int, int], object] | None,
         log: Callable[[str], None], ranks: Ranks, auto_threads: bool = False) -> dict:
    session = _prepare(config, run, resume, log, ranks)
    config = session.config  # on resume: the run's own
    if auto_threads and session.device.type == "cpu":
        chosen = apply_default_threads(session.model, config.batch_size // ranks.world_size)
        if chosen is not None:
            log(f"threads: {chosen} (from the model's work; --threads N to choose)")
    for epoch in range(session.start_epoch, config.epochs):
        row = _epoch(session, epoch, progress, log)
        _record(session, epoch, row)
        log(_epoch_line(config, row))
    summary = summarize(session.metrics, session.model)
    if ranks.is_main:
        write_final(run, config, session.model, summary)
    return summary


def _prepare(config: TrainConfig, run: RunDir, resume: bool, log: Callable[[str], None], ranks: Ranks) -> Session:
    """Data, model, optimizer and rewirer; then the run directory (locked) and, on resume, the
    checkpoint. A refused config leaves no run behind: the folder is touched last."""
    if resume:
        config = distributed.on_main(ranks, lambda: config_from_file(run.read_config(), run.config))
    device = distributed.device_for(config.device, ranks)
    torch.manual_seed(config.seed)
    data = _splits(config, device)
    model = build_model(config, data.x_train.shape[1], data.n_classes).to(device)
    optimizer = sgd(model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    rewirer = build_rewirer(config, model, optimizer, len(data.y_train))  # refuses an infeasible compress_to
    action = distributed.on_main(ranks, lambda: run.prepare(config.to_dict(), resume))
    session = Session(config, run, ranks, device, data, model, optimizer, rewirer, net=model)
    if action == "restart":
        log(f"{run.root} held a run that had not finished an epoch (no checkpoint.pt): starting it again "
            f"from epoch 1" + (" with its config.yaml" if resume else ""))
    if action == "resume":
        state = distributed.on_main(ranks, lambda: run.load_checkpoint("cpu"))
        session.metrics, session.topology, session.start_epoch = _restore(state, config, model, optimizer, rewirer,
                                                                          run.checkpoint)
        _restore_rng(state["rng"], device, ranks, log)
        log(f"resuming {run.root} after epoch {session.start_epoch}")
    else:
        distributed.seed_rank(config.seed, ranks)  # each rank its own dropout masks
    if ranks.distributed:
        distributed.check_synchronized(model, optimizer, ranks, "before training")
        log(f"data-parallel on {ranks.world_size} processes: each trains on 1/{ranks.world_size} "
            f"of every batch of {config.batch_size}")
    session.net = distributed.wrap(model, ranks, device)
    if config.save_topology_every and config.sparse and session.start_epoch == 0 and ranks.is_main:
        save_snapshot(model, run.snapshot(0), epoch=0)
    return session


def _splits(config: TrainConfig, device: torch.device) -> Splits:
    data = load_dataset(config.dataset, config.data_dir, config.limit_train, config.input_scaling)
    x_train, y_train = data.x_train, data.y_train
    train_index, val_index = split_validation(len(y_train), config.validation_fraction, config.seed)
    x_val, y_val = x_train[val_index].to(device), y_train[val_index].to(device)
    if len(val_index):
        x_train, y_train = x_train[train_index], y_train[train_index]
    return Splits(x_train.to(device), y_train.to(device), x_val, y_val, data.x_test.to(device),
                  data.y_test.to(device), data.n_classes)


def _epoch(s: Session, epoch: int, progress: Callable[[int, int], object] | None,
           log: Callable[[str], None]) -> dict:
    """Train one epoch, evaluate, snapshot and rewire; returns the epoch's ``metrics.csv`` row."""
    config, data, ranks = s.config, s.data, s.ranks
    started = time.perf_counter()
    s.model.train()
    n_train = len(data.y_train)
    # The data order depends only on (seed, epoch), so a resumed run sees the same batches.
    order = torch.randperm(n_train, generator=torch.Generator().manual_seed(config.seed * 100_003 + epoch))
    rewiring = _StepRewiring(s, epoch) if s.rewirer is not None and config.rewire_every is not None else None
    with progress(math.ceil(n_train / config.batch_size), epoch) if progress else nullcontext() as bar:
        loss_sum, correct, batch = _train_epoch(s, order, bar, epoch, rewiring)
    in_epoch_rewiring = rewiring.seconds if rewiring is not None else 0.0
    loss_sum, correct = distributed.all_sum([loss_sum, correct], ranks, s.device)
    train_seconds = distributed.all_max([time.perf_counter() - started], ranks, s.device)[0]
    test_accuracy = evaluate(s.model, data.x_test, data.y_test, ranks=ranks)
    validation = ({"validation_accuracy": evaluate(s.model, data.x_val, data.y_val, ranks=ranks)}
                  if len(data.y_val) else {})
    per_layer, live = connections(s.model), live_neurons(s.model)
    guard = accuracy_guard(config.accuracy_guard, s.metrics, validation, log)
    if config.save_topology_every and config.sparse and ranks.is_main and (
            (epoch + 1) % config.save_topology_every == 0 or epoch == config.epochs - 1):
        save_snapshot(s.model, s.run.snapshot(epoch + 1), epoch=epoch + 1)  # the wiring this epoch trained
    rewire_seconds = in_epoch_rewiring
    steps_done = (epoch + 1) * steps_per_epoch(config, n_train)
    if (s.rewirer is not None and config.rewire_every is None and epoch < config.epochs - 1  # none after the last
            and (config.rewire_until is None or steps_done < config.rewire_until)):
        started = time.perf_counter()
        last = batch.to(s.device)
        s.net, reports = _rewire(s.rewirer, s.net, (data.x_train[last], data.y_train[last]),
                                 not guard.get("compression_paused", 0), ranks, f"after rewiring step {epoch + 1}")
        rewire_seconds = time.perf_counter() - started
        s.topology += [{"epoch": epoch + 1, **r.as_dict()} for r in reports]
    return {
        "epoch": epoch + 1,
        "train_loss": loss_sum / n_train,
        "train_accuracy": correct / n_train,  # running accuracy over the epoch (dropout on)
        "test_accuracy": test_accuracy,
        **validation,
        **guard,
        "connections": sum(per_layer.values()),
        **{f"connections_{name}": count for name, count in per_layer.items()},
        **{f"live_{i + 1}": count for i, count in enumerate(live)},
        "epoch_seconds": train_seconds,
        "rewire_seconds": rewire_seconds,
    }


def _record(s: Session, epoch: int, row: dict) -> None:
    """Append the row; rank 0 writes the records and the checkpoint (every rank's RNG state)."""
    s.metrics.append(row)
    rng = _rng_state(s.device, s.ranks)
    if s.ranks.is_main:
        s.run.write_records(s.metrics, s.topology)
        s.run.save_checkpoint({
            "epoch": epoch + 1, "model": s.model.state_dict(), "optimizer": s.optimizer.state_dict(),
            "rewirer": s.rewirer.state_dict() if s.rewirer else None, "rng": rng,
            "metrics": s.metrics, "topology": s.topology, "config": s.config.to_dict(),
        })


def _epoch_line(config: TrainConfig, row: dict) -> str:
    val = f"val {100 * row['validation_accuracy']:.2f}%  " if "validation_accuracy" in row else ""
    return (f"epoch {row['epoch']}/{config.epochs}  loss {row['train_loss']:.4f}  "
            f"train {100 * row['train_accuracy']:.2f}%  {val}test {100 * row['test_accuracy']:.2f}%  "
            f"connections {row['connections']:,}  {row['epoch_seconds']:.1f}s (rewire {row['rewire_seconds']:.2f}s)")


def _restore(state: dict, config: TrainConfig, model: nn.Module, optimizer: torch.optim.Optimizer,
             rewirer: Rewirer | None, path: Path) -> tuple[list[dict], list[dict], int]:
    """Load a checkpoint's model, optimizer and rewirer states after checking that it belongs
    to this run: (metrics, topology records, epochs done). A foreign, edited or damaged
    checkpoint raises :class:`FileFormatError` naming it."""
    missing = sorted({"epoch", "model", "optimizer", "rewirer", "rng", "metrics", "topology"} - set(state))
    if missing:
        raise FileFormatError(path, f"is not a synthprune checkpoint (no {', '.join(missing)})", START_AGAIN)
    saved = state.get("config")
    if isinstance(saved, dict):
        saved = {**TrainConfig().to_dict(), **saved}  # a checkpoint from before a setting existed had its default
        differ = sorted(k for k, v in config.to_dict().items() if k not in RESUMABLE_CHANGES and saved.get(k) != v)
        if differ:
            raise FileFormatError(path.with_name("config.yaml"), f"{', '.join(differ)} differ(s) from the run "
                                  "this checkpoint belongs to", "restore the run's settings, or start a new run "
                                  "with another --out")
    epoch, metrics = state["epoch"], state["metrics"]
    if not (isinstance(epoch, int) and 0 < epoch <= config.epochs and isinstance(metrics, list)
            and len(metrics) == epoch and isinstance(state["topology"], list)):
        raise FileFormatError(path, f"records do not add up (epoch {epoch!r} of {config.epochs})", START_AGAIN)
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if rewirer is not None:
            rewirer.load_state_dict(state["rewirer"])
    except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as exc:
        reason = str(exc).strip().splitlines()[0][:200]
        raise FileFormatError(path, f"does not fit this run's model ({reason})", START_AGAIN) from None
    return metrics, state["topology"], epoch


def _rewire(rewirer: Rewirer, net: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], compress: bool,
            ranks: Ranks, when: str) -> tuple[nn.Module, list]:
    """One rewiring step; returns (the model as training calls it, the layer reports).

    Every rank rewires from the same state with the same (global) batch, so every rank decides
    alike; the digests prove it before DDP is rebuilt around the new wiring."""
    if not ranks.distributed:
        return net, rewirer.step(batch=batch, compress=compress)
    model = distributed.unwrap(net)  # DDP's references would block resizing the parameters
    reports = rewirer.step(batch=batch, compress=compress)
    distributed.check_synchronized(model, rewirer.optimizer, ranks, when)
    return distributed.wrap(model, ranks, next(model.parameters()).device), reports


def steps_per_epoch(config: TrainConfig, n_train: int) -> int:
    """Optimizer steps in one epoch (global batches)."""
    return math.ceil(n_train / config.batch_size)


class _StepRewiring:
    """``--rewire-every N``: after each optimizer step the Rewirer's schedule says is due
    (never after the run's last step), rewire on that step's global batch. The accuracy
    guard's verdict of the previous epoch holds for this one's steps."""

    def __init__(self, s: Session, epoch: int) -> None:
        self.s, self.epoch, self.seconds = s, epoch, 0.0
        self.per_epoch = steps_per_epoch(s.config, len(s.data.y_train))
        self.last_step = s.config.epochs * self.per_epoch
        self.compress = not (s.metrics and s.metrics[-1].get("compression_paused", 0))

    def __call__(self, b: int, batch: torch.Tensor) -> None:
        step = self.epoch * self.per_epoch + b + 1
        s = self.s
        if step >= self.last_step or not s.rewirer.rewire_schedule.due(step):
            return
        started = time.perf_counter()
        index = batch.to(s.device)
        s.net, reports = _rewire(s.rewirer, s.net, (s.data.x_train[index], s.data.y_train[index]), self.compress,
                                 s.ranks, f"after optimizer step {step}")
        self.seconds += time.perf_counter() - started
        s.topology += [{"epoch": self.epoch + 1, "optimizer_step": step, **r.as_dict()} for r in reports]


def _train_epoch(s: Session, order: torch.Tensor, bar, epoch: int,
                 after_step: Callable[[int, torch.Tensor], None] | None) -> tuple[float, float, torch.Tensor]:
    """One pass over ``order`` in global batches of ``config.batch_size``, this rank training on
    its shard of each; ``after_step(batch number, global batch indices)`` runs after every
    optimizer step (step-based rewiring; it may replace ``s.net``). Returns (this rank's
    summed loss, its correct predictions, the last global batch's indices)."""
    config, ranks, optimizer, checkpoint = s.config, s.ranks, s.optimizer, s.run.checkpoint
    x, y = s.data.x_train, s.data.y_train
    loss_sum = correct = 0.0
    size = config.batch_size
    for b in range(math.ceil(len(order) / size)):
        net = s.net
        batch = order[b * size : (b + 1) * size]
        index = distributed.shard(batch, ranks).to(x.device)
        xb, yb = x[index], y[index]
        optimizer.zero_grad(set_to_none=True)
        logits = net(xb)
        if ranks.distributed:
            # DDP averages the ranks' gradients: each shard's loss *sum* over the global batch
            # size, times the number of ranks, makes that average the global batch's mean, as
            # on one process -- also when a shard is short or empty (a last batch of 1).
            shard_sum = F.cross_entropy(logits, yb, reduction="sum")
            objective = shard_sum * (ranks.world_size / len(batch))
            loss = shard_sum.detach() / max(len(yb), 1)
        else:
            objective = loss = F.cross_entropy(logits, yb)
        # Whether any rank's loss is NaN/inf; the all-reduce runs during backward.
        non_finite = distributed.any_rank(not torch.isfinite(objective), ranks, x.device)
        objective.backward()
        if non_finite():  # every rank stops here together, before a bad optimizer step
            where = "on at least one rank " if ranks.distributed else ""
            kept = (f"the last good checkpoint is {checkpoint} (after epoch {epoch})" if epoch else
                    f"no epoch finished, so nothing is lost: start again with the same --out {checkpoint.parent}")
            raise distributed.shared_error(TrainingError(
                f"loss became non-finite ({loss.item()} here) {where}at epoch {epoch + 1}, batch {b + 1}: lower "
                f"--lr (now {config.lr}); {kept}"), ranks)
        optimizer.step()
        if after_step is not None:
            after_step(b, batch)
        batch_loss = loss.item()
        loss_sum += batch_loss * len(yb)
        correct += (logits.argmax(1) == yb).sum().item()
        if bar is not None:
            bar.advance(batch_loss, correct / min(len(order), (b + 1) * size) * ranks.world_size)
    return loss_sum, correct, batch


def _rng_state(device: torch.device, ranks: Ranks) -> dict:
    """The random state a resumed run needs (every rank's, gathered on all ranks)."""
    rng = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    if ranks.distributed:
        per_rank = distributed.gather(rng, ranks)
        rng = {**per_rank[0], "ranks": per_rank}
    return rng


def _restore_rng(rng: dict, device: torch.device, ranks: Ranks, log: Callable[[str], None]) -> None:
    saved = rng.get("ranks", [rng])
    if len(saved) != ranks.world_size:
        log(f"this run was checkpointed with {len(saved)} process(es), it resumes with {ranks.world_size}: "
            "the data and wiring continue exactly, dropout masks do not")
    mine = saved[ranks.rank] if ranks.rank < len(saved) else None
    if mine is None:
        torch.manual_seed(int(torch.initial_seed()) + 1_000_003 * ranks.rank)
        return
    torch.set_rng_state(mine["torch"])
    if device.type == "cuda" and "cuda" in mine:
        if isinstance(mine["cuda"], list):  # checkpoints before 0.x kept every GPU's state
            torch.cuda.set_rng_state_all(mine["cuda"])
        else:
            torch.cuda.set_rng_state(mine["cuda"], device)


def accuracy_guard(points: float | None, metrics: list[dict], validation: dict, log: Callable[[str], None]) -> dict:
    """``{"compression_paused": 0|1}`` (``{}`` without a guard): pause shrinking while this
    epoch's validation accuracy is more than ``points`` below the best so far. It looks at
    held-out training data only; the test set never steers training."""
    if points is None:
        return {}
    best = max(row["validation_accuracy"] for row in [*metrics, validation])
    paused = 100 * (best - validation["validation_accuracy"]) > points
    if paused:
        log(f"compression paused: validation {100 * validation['validation_accuracy']:.2f}% is more than "
            f"{points} points below its best {100 * best:.2f}%")
    return {"compression_paused": int(paused)}


def split_validation(n: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(training indices, held-out validation indices) of a training set of ``n`` examples: a
    seeded random ``fraction`` is held out (none when 0)."""
    n_val = round(fraction * n)
    if fraction > 0 and not 1 <= n_val < n:
        raise ValueError(f"validation_split={fraction} of {n} training examples leaves no validation "
                         "or no training data")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if n_val else torch.arange(n)
    return order[: n - n_val].sort().values, order[n - n_val :].sort().values


def build_rewirer(config: TrainConfig, model: nn.Module, optimizer: torch.optim.Optimizer,
                  n_train: int) -> Rewirer | None:
    """The Rewirer of a sparse config (``None`` for the dense baseline). Rewiring steps are
    numbered from 0: by default one after each epoch but the last; with ``rewire_every`` one
    after every N-th optimizer step (never after the last). Either way none at or after
    optimizer step ``rewire_until``. Compression epochs become the rewiring steps inside them."""
    if not config.sparse:
        return None
    per_epoch = steps_per_epoch(config, n_train)
    if config.rewire_every is None:
        schedule = None
        epochs_rewired = [e for e in range(1, config.epochs)
                          if config.rewire_until is None or e * per_epoch < config.rewire_until]
        total = len(epochs_rewired)

        def before(epoch: int) -> int:  # rewiring steps done before the one after `epoch` (1-based)
            return sum(1 for e in epochs_rewired if e < epoch)

        window = (before, lambda epoch: before(epoch + 1) - 1)
    else:
        schedule = RewireSchedule(config.rewire_every, config.rewire_until)
        total = schedule.count(config.epochs * per_epoch - 1)
        window = (lambda epoch: schedule.count((epoch - 1) * per_epoch),
                  lambda epoch: schedule.count(min(epoch * per_epoch, config.epochs * per_epoch - 1)) - 1)
    if total == 0 and config.rewire_every is not None:
        raise ConfigError("rewire_every", "leaves no rewiring step in this run (with rewire_until "
                                          f"{config.rewire_until} and {per_epoch} optimizer steps per epoch)")
    compression = {}
    if config.compress_to is not None:
        first, last = config.compress_epochs
        start, end = window[0](first), window[1](last)
        if end < start:
            raise ConfigError("compress_start", f"and compress_end (epochs {first}..{last}) hold no rewiring step "
                                                "with these rewire_every / rewire_until settings")
        compression = {"compress_to": config.compress_to, "compress_scope": config.compress_scope,
                       "compress_start_step": start, "compress_end_step": end}
    return Rewirer(model, optimizer, schedule=schedule, prune=config.prune, grow=config.grow, zeta=config.zeta,
                   zeta_schedule=config.zeta_schedule, total_steps=max(1, total), seed=config.seed,
                   new_weights=config.new_weights, new_weight_std=config.new_weight_std, grace_steps=config.grace_steps,
                   **compression, **config.strategy_options())
