"""Data-parallel training across processes (torchrun): who this process is, sharding, the few
collectives ``fit()`` needs, and the check that every replica holds the same wiring.

Every rank builds the same model from the same seed and keeps it identical: DDP averages the
gradients (so every optimizer step is the same everywhere) and every rank runs the same
rewiring step on the same state and the same batch (decided identically, not broadcast; the
per-layer digests of wiring, values and optimizer state are compared across ranks after every
step, so a divergence stops the run with the layer it happened in). Only rank 0 touches the run
directory; what it reads (config, checkpoint) reaches the others by broadcast, so several
machines need no shared file system.

Single-process runs never initialise ``torch.distributed``: :data:`SINGLE` stands in.
"""

from __future__ import annotations

import gc
import hashlib
import inspect
import logging
import os
import pickle
import sys
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import nn

from synthprune.models import sparse_layers

__all__ = [
    "SINGLE",
    "Ranks",
    "SynchronizationError",
    "all_max",
    "all_sum",
    "any_rank",
    "check_synchronized",
    "device_for",
    "gather",
    "launch_local",
    "leave",
    "on_main",
    "rewire_ddp",
    "seed_rank",
    "shard",
    "shared_error",
    "start",
    "stop",
    "synchronized_digests",
    "unwrap",
    "wrap",
]

T = TypeVar("T")


class SynchronizationError(RuntimeError):
    """Ranks that must hold the same model do not."""


@dataclass(frozen=True)
class Ranks:
    """This process's place in the job: ``rank`` in ``[0, world_size)``; ``local_rank`` on its
    machine (picks the GPU). ``owns_group``: :func:`start` created the process group, so
    :func:`stop` destroys it."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


SINGLE = Ranks()


def start() -> Ranks:
    """Join the job torchrun described in the environment (``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``, ``MASTER_ADDR``...), or :data:`SINGLE` outside torchrun or with one process.
    The group speaks gloo for CPU tensors and, where CUDA exists, nccl for CUDA tensors."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return SINGLE
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() and local_rank < torch.cuda.device_count()
    if cuda:
        torch.cuda.set_device(local_rank)  # nccl's object collectives use the current device
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo")
    return Ranks(dist.get_rank(), dist.get_world_size(), local_rank, owns)


def device_for(device: str, ranks: Ranks) -> torch.device:
    """The device this rank trains on: ``cuda`` becomes ``cuda:<local_rank>`` when distributed."""
    target = torch.device(device)
    if not ranks.distributed:
        return target
    if target.type == "cuda" and target.index is None:
        target = torch.device("cuda", ranks.local_rank)
    if target.type not in ("cpu", "cuda"):
        raise ValueError(f"distributed training runs on cpu (gloo) or cuda (nccl), not {device!r}")
    return target


def launch_local(nproc: int, args: list[str]) -> int:
    """``torchrun --standalone --nproc_per_node=nproc -m synthprune ARGS``, in this process;
    returns the workers' exit code (the first failure's). Each worker gets an equal share of
    this machine's cores unless OMP_NUM_THREADS is set. torchrun's own failure report is
    silenced: the failing worker has printed its one-line error already."""
    if "WORLD_SIZE" in os.environ:
        raise ValueError("--nproc starts torchrun itself; under torchrun leave it out")
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, cores // nproc)))  # the workers inherit it
    for name in list(logging.root.manager.loggerDict):  # elastic sets each logger's level itself
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0)
    try:
        elastic_launch(config, sys.executable)("-m", "synthprune", *args)
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        if failure.exitcode > 0:
            return failure.exitcode  # the worker has said why
        print(f"error: worker rank {rank} was killed by {failure.signal_name()}", file=sys.stderr)
        return 1
    except (SignalException, KeyboardInterrupt):  # Ctrl-C: the workers checkpoint and stop
        return 130
    return 0


def leave(ranks: Ranks, error: BaseException | None = None,
          expected: tuple[type[BaseException], ...] = ()) -> None:
    """End of a run: free the DDP wrapper, then :func:`stop`. ``error``: what the run raised.

    The wrapper must be gone before the process group, or its reducer may abort the process
    at exit; the error's traceback holds the frames that hold it, so it is dropped. An error
    not in ``expected`` (nor a :class:`SynchronizationError`) is a bug: its traceback is
    printed first, prefixed with the rank."""
    if ranks.distributed:
        if error is not None:
            if not isinstance(error, (*expected, SynchronizationError)):
                print(f"[rank {ranks.rank}] " + "".join(traceback.format_exception(error)), file=sys.stderr)
            error.__traceback__ = None
        gc.collect()  # DDP objects sit in reference cycles
    stop(ranks, together=error is None or getattr(error, "shared_by_all_ranks", False))


def stop(ranks: Ranks, *, together: bool = True) -> None:
    """Leave the process group if :func:`start` created it. ``together`` (a finished run, or an
    error every rank raised): wait for all ranks first, since a rank tearing down gloo while
    another still talks to it can abort. Otherwise (a rank's own error) leave at once: waiting
    for ranks stuck elsewhere would hang; torchrun stops them."""
    if ranks.owns_group:
        import torch.distributed as dist

        if together:
            dist.barrier()
        dist.destroy_process_group()


def shard(tensor: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """This rank's contiguous share of ``tensor`` along dim 0, a view (e.g. of a global batch of
    indices, or of the test set); the shares' sizes differ by at most one."""
    return tensor.tensor_split(ranks.world_size)[ranks.rank] if ranks.distributed else tensor


def _reduce(values: list[float], ranks: Ranks, device: torch.device, op: str) -> list[float]:
    if not ranks.distributed:
        return list(values)
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=getattr(dist.ReduceOp, op))
    return tensor.tolist()


def all_sum(values: list[float], ranks: Ranks, device: torch.device) -> list[float]:
    """Element-wise sum over ranks (float64, so counts stay exact)."""
    return _reduce(values, ranks, device, "SUM")


def all_max(values: list[float], ranks: Ranks, device: torch.device) -> list[float]:
    return _reduce(values, ranks, device, "MAX")


def any_rank(flag: bool, ranks: Ranks, device: torch.device) -> Callable[[], bool]:
    """Whether ``flag`` holds on any rank, as a function to call later: the all-reduce runs in
    the background meanwhile (e.g. during backward), so the answer costs no waiting."""
    if not ranks.distributed:
        return lambda: flag
    import torch.distributed as dist

    tensor = torch.tensor([float(flag)], device=device)
    work = dist.all_reduce(tensor, op=dist.ReduceOp.MAX, async_op=True)

    def result() -> bool:
        work.wait()
        return bool(tensor.item() > 0)

    return result


def gather(value: T, ranks: Ranks) -> list[T]:
    """Every rank's ``value`` (any picklable object), in rank order, on every rank."""
    if not ranks.distributed:
        return [value]
    import torch.distributed as dist

    values: list = [None] * ranks.world_size
    dist.all_gather_object(values, value)
    return values


def seed_rank(seed: int, ranks: Ranks) -> None:
    """Give each rank of a data-parallel run its own random stream (dropout masks); one
    process keeps the stream ``torch.manual_seed(seed)`` started."""
    if ranks.distributed:
        torch.manual_seed(seed + 1_000_003 * ranks.rank)


def on_main(ranks: Ranks, work: Callable[[], T]) -> T:
    """Run ``work`` on rank 0 only and hand its result to every rank. If it raises, every rank
    raises the same error type and message (so a refused config stops the whole job with one
    clear message instead of leaving the other ranks waiting)."""
    if not ranks.distributed:
        return work()
    import torch.distributed as dist

    box: list = [None]
    failure: Exception | None = None
    if ranks.is_main:
        try:
            box[0] = ("ok", work())
        except Exception as exc:
            failure = exc
            box[0] = ("error", exc if _picklable(exc) else RuntimeError(str(exc)))
    dist.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status == "error":
        raise shared_error(failure if failure is not None else value, ranks)  # value: rank 0's, unpickled
    return value


def _picklable(value: object) -> bool:
    try:
        pickle.dumps(value)
    except Exception:
        return False
    return True


def shared_error(exc: Exception, ranks: Ranks) -> Exception:
    """``exc``, raised by every rank together (``shared_by_all_ranks``, so they can leave the
    group together), and marked on ranks other than 0 (``reported_by_main``) so that the
    command line prints it once, from rank 0."""
    exc.shared_by_all_ranks = True
    exc.reported_by_main = not ranks.is_main
    return exc


def wrap(model: nn.Module, ranks: Ranks, device: torch.device) -> nn.Module:
    """``model`` inside DistributedDataParallel (itself when single-process).

    Call again after every rewiring step: a layer whose number of connections changed holds a
    new tensor (``swap_tensors``), so the old wrapper's gradient hooks and buckets no longer
    fit. Construction also checks that parameter shapes agree across ranks. Buffers (the
    wiring) are not broadcast on every forward: they are equal by construction, and
    :func:`check_synchronized` verifies it.
    """
    if not ranks.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    # torch >= 2.12 renamed the option; either way buffers are not re-broadcast on every forward.
    quiet_buffers = ({"forward_sync_buffers": False} if "forward_sync_buffers" in
                     inspect.signature(DistributedDataParallel).parameters else {"broadcast_buffers": False})
    return DistributedDataParallel(model, device_ids=ids, **quiet_buffers)


def unwrap(net: nn.Module) -> nn.Module:
    """The model inside a :func:`wrap` result, with the wrapper destroyed now: its reducer holds
    references to every parameter, which would stop a rewiring step from swapping in a resized
    one (``swap_tensors`` needs the tensor unshared)."""
    model = getattr(net, "module", net)
    if model is not net:
        # The reducer (and its logger) hold the C++ references. DDP objects sit in reference
        # cycles, so dropping `net` alone frees them only at the next full gc (~0.15 s).
        holders = [name for name in ("reducer", "logger") if hasattr(net, name)]
        for name in holders:
            delattr(net, name)
        if not holders:  # a PyTorch that names them otherwise: the slow, sure way
            del net
            gc.collect()
    return model


def rewire_ddp(net: nn.Module, rewirer, batch=None, *, compress: bool = True, check: bool = True):
    """One rewiring step of a model trained under ``DistributedDataParallel``, from your own
    loop; returns ``(the wrapper to train with from now on, the layer reports)``::

        ddp = DistributedDataParallel(model)
        rewirer = synthprune.Rewirer(ddp, optimizer, grow="synthesis", compress_to=0.05, ...)
        ...
        ddp, reports = synthprune.rewire_ddp(ddp, rewirer)      # instead of rewirer.step()

    A step that changes a layer's number of connections swaps in a new tensor, which DDP's
    reducer (it holds every parameter) would block; so the wrapper is taken apart first and a
    new one is built around the same module with the same settings (process group, devices,
    buckets, buffer and unused-parameter options). Every rank must call it with the same
    ``batch`` (gradient growth): ranks then decide alike. ``check`` compares digests of the
    wiring, values and optimizer state across ranks and raises :class:`SynchronizationError`
    if they differ. A model that is not wrapped is simply rewired."""
    from torch.nn.parallel import DistributedDataParallel

    if not isinstance(net, DistributedDataParallel):
        return net, rewirer.step(batch=batch, compress=compress)
    settings = _ddp_settings(net)
    model = unwrap(net)
    reports = rewirer.step(batch=batch, compress=compress)
    if check:
        group = settings["process_group"]
        mine = synchronized_digests(model, rewirer.optimizer)
        everyone: list = [None] * torch.distributed.get_world_size(group)
        torch.distributed.all_gather_object(everyone, mine, group=group)
        differing = sorted({key for other in everyone for key in mine if other.get(key) != mine[key]})
        if differing:
            raise SynchronizationError(f"ranks disagree after rewiring step {rewirer.step_count - 1} on "
                                       f"{', '.join(differing)}: give every rank the same batch and seed")
    return DistributedDataParallel(model, **settings), reports


def _ddp_settings(net: nn.Module) -> dict:
    """The constructor arguments a DistributedDataParallel was built with (those it keeps)."""
    params = inspect.signature(type(net).__init__).parameters
    settings = {"device_ids": net.device_ids or None, "output_device": net.output_device, "dim": net.dim,
                "process_group": net.process_group, "bucket_cap_mb": net.bucket_bytes_cap / (1024 * 1024),
                "find_unused_parameters": net.find_unused_parameters,
                "gradient_as_bucket_view": net.gradient_as_bucket_view, "static_graph": net.static_graph}
    # torch >= 2.12 calls the buffer option forward_sync_buffers; earlier, broadcast_buffers.
    if "forward_sync_buffers" in params and hasattr(net, "forward_sync_buffers"):
        settings["forward_sync_buffers"] = net.forward_sync_buffers
    elif hasattr(net, "broadcast_buffers"):
        settings["broadcast_buffers"] = net.broadcast_buffers
    return settings


def _digest(*tensors: torch.Tensor) -> str:
    hasher = hashlib.blake2b(digest_size=8)
    for tensor in tensors:
        data = tensor.detach().contiguous().cpu()
        hasher.update(str((data.dtype, tuple(data.shape))).encode())
        hasher.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return hasher.hexdigest()


def synchronized_digests(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, str]:
    """Short hashes of what every rank must hold alike: each sparse layer's wiring (edge keys),
    every module's parameters, and the optimizer state of each parameter.
    ``{"<layer>.wiring" | "<module>.values" | "<module>.optimizer": hex digest}``."""
    digests = {f"{name}.wiring": _digest(layer.keys()) for name, layer in sparse_layers(model)}
    for name, module in model.named_modules():
        params = list(module.parameters(recurse=False))
        if not params:
            continue
        label = name or "model"
        digests[f"{label}.values"] = _digest(*params)
        if optimizer is not None:
            state = [v for p in params for v in optimizer.state.get(p, {}).values() if torch.is_tensor(v)]
            digests[f"{label}.optimizer"] = _digest(*state)
    return digests


def check_synchronized(model: nn.Module, optimizer: torch.optim.Optimizer | None, ranks: Ranks,
                       when: str) -> dict[str, str]:
    """Compare :func:`synchronized_digests` across ranks; raises :class:`SynchronizationError`
    naming what differs and where. Returns this rank's digests (equal on all ranks)."""
    mine = synchronized_digests(model, optimizer)
    if not ranks.distributed:
        return mine
    differing = sorted({key for other in gather(mine, ranks) for key in mine if other.get(key) != mine[key]})
    if differing:
        raise shared_error(SynchronizationError(
            f"ranks disagree {when} on {', '.join(differing)}: the replicas no longer hold the same model "
            "(a non-deterministic kernel or a rank-dependent setting?); stopping before they drift further"), ranks)
    return mine
