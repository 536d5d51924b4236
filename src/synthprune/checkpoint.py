"""Checkpoints for your own training loop: one call saves, one call restores, model, optimizer,
rewirer and every random state, so that a resumed loop continues bit for bit.

    synthprune.save_checkpoint("ckpt.pt", model, optimizer, rewirer, step=step)
    ...
    extra = synthprune.load_checkpoint("ckpt.pt", model, optimizer, rewirer)   # {"step": ...}

The file is one ``torch.save`` dict of tensors and plain containers, written atomically (a
crash leaves the previous file whole) and loaded with ``weights_only=True`` (nothing in it
runs). Restoring goes model → optimizer → rewirer: the model's state dict carries its wiring
(a compressed layer is resized), and the rewirer then checks that the wiring is the one its
state was saved with, so a state can never silently regrow or misalign a model.
"""

from __future__ import annotations

import io
import random
from pathlib import Path

import numpy as np
import torch
from torch import nn

from synthprune.files import FileFormatError, atomic_write, load_torch
from synthprune.rewiring import Rewirer

__all__ = ["CHECKPOINT_FORMAT", "load_checkpoint", "random_state", "save_checkpoint", "set_random_state"]

CHECKPOINT_FORMAT = "synthprune-checkpoint"


def _inner(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel (or DataParallel) wrapper, else itself."""
    return model.module if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) else model


def random_state() -> dict:
    """The states of torch's CPU (and every CUDA device's) generator, NumPy's global generator
    and Python's ``random``, as tensors and plain containers."""
    name, keys, position, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)},
             "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_random_state(state: dict) -> None:
    """Restore what :func:`random_state` returned."""
    torch.set_rng_state(state["torch"])
    numpy = state["numpy"]
    np.random.set_state((numpy["name"], numpy["keys"].numpy().astype(np.uint32), numpy["position"],
                         numpy["has_gauss"], numpy["gauss"]))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    rewirer: Rewirer | None = None, **extra) -> Path:
    """Write model, optimizer, rewirer and random states to ``path`` atomically; ``extra``
    (e.g. ``step=1200, epoch=3``: tensors, numbers, strings, lists, dicts) comes back from
    :func:`load_checkpoint`. A DDP-wrapped model is saved as its inner module."""
    state = {
        "format": CHECKPOINT_FORMAT, "version": 1,
        "model": _inner(model).state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "rewirer": rewirer.state_dict() if rewirer is not None else None,
        "random": random_state(),
        "extra": extra,
    }
    buffer = io.BytesIO()
    torch.save(state, buffer)
    path = Path(path)
    atomic_write(path, buffer.getvalue())
    return path


def load_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    rewirer: Rewirer | None = None, *, restore_random: bool = True,
                    map_location: str | torch.device = "cpu") -> dict:
    """Restore what :func:`save_checkpoint` wrote into ``model``, ``optimizer`` and
    ``rewirer`` (built as for a fresh start, the rewirer after the optimizer), and the random
    states; returns the ``extra`` values.

    Raises :class:`~synthprune.files.FileFormatError` for a file that is not such a checkpoint
    or does not fit the model, and ``ValueError`` when the rewirer's settings or the wiring do
    not match the saved state."""
    todo = "pass the checkpoint written by synthprune.save_checkpoint for this model"
    state = load_torch(path, todo, map_location=map_location)
    if state.get("format") != CHECKPOINT_FORMAT:
        raise FileFormatError(path, f"is not a synthprune checkpoint (format {state.get('format')!r})", todo)
    for name, given in (("optimizer", optimizer), ("rewirer", rewirer)):
        if given is not None and state.get(name) is None:
            raise FileFormatError(path, f"holds no {name} state", f"save it with save_checkpoint(..., {name}=...)")
    try:
        _inner(model).load_state_dict(state["model"])
    except (RuntimeError, ValueError, KeyError) as exc:
        reason = str(exc).strip().splitlines()[0][:200]
        raise FileFormatError(path, f"does not fit this model ({reason})", todo) from None
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if rewirer is not None:
        rewirer.load_state_dict(state["rewirer"])
    if restore_random:
        set_random_state(state["random"])
    return dict(state.get("extra") or {})
