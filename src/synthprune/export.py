"""From a finished run to deployable files: the residual network (``final/residual/``) and
its ONNX export. Used by ``synthprune residual`` and ``synthprune export``."""

from __future__ import annotations

import contextlib
import logging
import math
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from synthprune.files import atomic_write
from synthprune.residual import ResidualMLP, ResidualSummary, residual_network, save_residual
from synthprune.rundir import RunDir
from synthprune.runs import load_run_model

__all__ = ["ResidualFiles", "export_onnx", "write_residual"]

BYTES_PER_WEIGHT = 4  # float32, for the dense network's size


@dataclass
class ResidualFiles:
    folder: Path
    summary: ResidualSummary
    sparse_bytes: int  # the run's final/model.safetensors
    residual_bytes: int  # final/residual/model.safetensors

    @property
    def dense_bytes(self) -> int:
        """What the dense network of the same sizes takes as float32 weights and biases."""
        return self.summary.dense_parameters * BYTES_PER_WEIGHT


def write_residual(run: str | Path, form: str = "csr") -> ResidualFiles:
    """Build the residual network of a finished run and write ``RUN/final/residual/``."""
    run_dir = RunDir(run)
    model, config = load_run_model(run)
    residual, summary = residual_network(model.eval(), form=form)
    with run_dir.lock:  # the run directory's one writer
        folder = save_residual(residual, run_dir.final / "residual",
                               extra={"summary": summary.as_dict(), "trained_with": config.to_dict()})
    return ResidualFiles(folder, summary, (run_dir.final / "model.safetensors").stat().st_size,
                         (folder / "model.safetensors").stat().st_size)


def export_onnx(run: str | Path, path: str | Path | None = None, opset: int = 18) -> Path:
    """Write the run's residual network as ONNX (dense layers: ONNX has no sparse matmul that
    runtimes agree on) with a dynamic batch dimension; returns the file's path. Needs the
    ``[onnx]`` extra (``onnx``, ``onnxscript``)."""
    for module in ("onnx", "onnxscript"):
        try:
            __import__(module)
        except ImportError:
            raise ValueError(f"ONNX export needs the {module!r} package: pip install 'synthprune[onnx]'") from None
    model, _ = load_run_model(run)
    residual, _ = residual_network(model.eval(), form="dense")
    run_dir = RunDir(run)
    target = Path(path) if path is not None else run_dir.final / "residual" / "model.onnx"
    with run_dir.lock if path is None else contextlib.nullcontext():  # writing into the run: its one writer
        _export(residual, target, opset)
    return target


def _n_features(residual: torch.nn.Module) -> int:
    """Input features of a residual network: a ResidualMLP's, or a compact CNN's flattened
    image (it starts with ``nn.Unflatten``) or first linear layer's."""
    if isinstance(residual, ResidualMLP):
        return residual.n_features
    first = residual[0]
    return math.prod(first.unflattened_size) if isinstance(first, torch.nn.Unflatten) else first.in_features


def _export(residual: torch.nn.Module, target: Path, opset: int) -> None:
    """The exporter writes a file itself: it writes into a private temporary folder, and the
    bytes reach ``target`` through :func:`atomic_write` (umask modes, never half-written)."""
    example = torch.zeros(2, _n_features(residual))
    scratch = tempfile.TemporaryDirectory(prefix="synthprune-onnx-")
    tmp = Path(scratch.name) / "model.onnx"
    # The exporter logs and warns about things irrelevant here (torchvision ops, pytree
    # deprecations); keep the command's output to what the user asked for.
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(None):
            warnings.simplefilter("ignore")
            torch.onnx.export(
                residual, (example,), str(tmp), input_names=["input"], output_names=["logits"],
                dynamic_shapes=({0: torch.export.Dim("batch")},), opset_version=opset, dynamo=True,
                external_data=False, verbose=False,
            )
        atomic_write(target, tmp.read_bytes())
    finally:
        quiet.setLevel(level)
        scratch.cleanup()
