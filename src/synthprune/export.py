"""Deployable files: a run's residual network (``final/residual/``), and ONNX of any residual
network or trained sparse model (``export_onnx``), its file kept sparse by
:mod:`synthprune.onnx_graph`. Used by ``synthprune residual`` and ``synthprune export``."""

from __future__ import annotations

import contextlib
import logging
import math
import tempfile
import warnings
from collections import Counter
from copy import deepcopy
from dataclasses import dataclass
from pathlib import Path

import torch

from synthprune.files import atomic_write
from synthprune.layers import SparseLayer
from synthprune.models import unwrapped
from synthprune.onnx_graph import LayerChoice, check_form, compress_graph
from synthprune.residual import ResidualMLP, ResidualSummary, residual_network, save_residual
from synthprune.rundir import RunDir
from synthprune.runs import load_run_model

__all__ = ["OnnxExport", "ResidualFiles", "export_onnx", "export_run_onnx", "write_residual"]

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


@dataclass
class OnnxExport:
    """What :func:`export_onnx` wrote: the file, its size, and the form of each weight."""

    path: Path
    bytes: int
    layers: list[LayerChoice]

    def describe(self) -> str:
        """e.g. ``3 weights computed sparse, 1 dense``."""
        words = {"gather": "computed sparse", "initializer": "stored sparse (densified at load)", "dense": "dense"}
        counts = Counter(layer.form for layer in self.layers)
        parts = [f"{counts[form]} {'weight' if counts[form] == 1 else 'weights'} {words[form]}"
                 for form in words if counts[form]]
        return ", ".join(parts) or "no weights"


def export_onnx(net: torch.nn.Module, path: str | Path, form: str = "auto",
                example_input: torch.Tensor | None = None, opset: int = 18) -> OnnxExport:
    """Write ``net`` as ONNX with a dynamic batch dimension, keeping the compression on disk.

    ``net``: a residual network (``ResidualMLP``, or the ``nn.Sequential`` of a CNN's), or a
    trained sparse model, whose residual network is taken first (where ``residual_network``
    cannot handle the model, the model itself is exported, its sparse layers made dense
    matrices first). ``form``: ``"auto"`` (per layer: computed sparse at ≤ 2% density, else a
    sparse initializer the runtime densifies at load; both keep the file small), ``"sparse"``
    (every sparse linear layer computed sparse), ``"densify"`` (every sparse weight stored
    sparse, densified at load) or ``"dense"`` (dense matrices, the largest file); see
    :mod:`synthprune.onnx_graph`. ``example_input``: one batch, needed only where the
    input size cannot be read from the network. Needs the ``[onnx]`` extra."""
    check_form(form)
    _require_onnx()
    deployable = _deployable(net, example_input)
    example = example_input if example_input is not None else torch.zeros(2, _n_features(deployable))
    target = Path(path)
    choices = _export(deployable, example, target, opset, form)
    return OnnxExport(target, target.stat().st_size, choices)


def export_run_onnx(run: str | Path, path: str | Path | None = None, form: str = "auto") -> OnnxExport:
    """A finished run's residual network as ONNX (default ``RUN/final/residual/model.onnx``)."""
    check_form(form)
    _require_onnx()
    model, _ = load_run_model(run)
    run_dir = RunDir(run)
    target = Path(path) if path is not None else run_dir.final / "residual" / "model.onnx"
    with run_dir.lock if path is None else contextlib.nullcontext():  # writing into the run: its one writer
        return export_onnx(model, target, form)


def _require_onnx() -> None:
    for module in ("onnx", "onnxscript"):
        try:
            __import__(module)
        except ImportError:
            raise ValueError(f"ONNX export needs the {module!r} package: pip install 'synthprune[onnx]'") from None


def _deployable(net: torch.nn.Module, example_input: torch.Tensor | None) -> torch.nn.Module:
    """What is exported: the residual network of a trained sparse model, and in any case a copy
    whose sparse layers are plain ``nn.Linear``/``nn.Conv*`` (the exporter traces dense
    products; :func:`compress_graph` makes the file sparse again)."""
    net = unwrapped(net)
    trained = any(isinstance(m, SparseLayer) for m in net.modules()) and not isinstance(net, ResidualMLP)
    if trained:
        with contextlib.suppress(ValueError):  # a model residual_network does not handle: exported as it is
            net, _ = residual_network(net.eval(), form="dense", example_input=example_input)
    return _dense_copy(net).eval()


def _dense_copy(net: torch.nn.Module) -> torch.nn.Module:
    copy = deepcopy(net)
    for parent in list(copy.modules()):
        for name, child in parent.named_children():
            if isinstance(child, SparseLayer):
                setattr(parent, name, child.to_dense())
    return copy


def _n_features(residual: torch.nn.Module) -> int:
    """Input features of a residual network: a ResidualMLP's, or a compact CNN's flattened
    image (it starts with ``nn.Unflatten``) or first linear layer's."""
    if isinstance(residual, ResidualMLP):
        return residual.n_features
    first = residual[0] if isinstance(residual, torch.nn.Sequential) and len(residual) else None
    if isinstance(first, torch.nn.Unflatten):
        return math.prod(first.unflattened_size)
    if isinstance(first, torch.nn.Linear):
        return first.in_features
    raise ValueError("cannot tell this network's input size: pass example_input (one batch)")


def _export(net: torch.nn.Module, example: torch.Tensor, target: Path, opset: int, form: str) -> list[LayerChoice]:
    """The exporter writes a file itself: it writes into a private temporary folder, the graph
    is rewritten there, and the bytes reach ``target`` through :func:`atomic_write` (umask
    modes, never half-written)."""
    import onnx

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
                net, (example,), str(tmp), input_names=["input"], output_names=["logits"],
                dynamic_shapes=({0: torch.export.Dim("batch")},), opset_version=opset, dynamo=True,
                external_data=False, verbose=False,
            )
        model = onnx.load(str(tmp))
        choices = compress_graph(model, form)
        onnx.checker.check_model(model)
        atomic_write(target, model.SerializeToString())
    finally:
        quiet.setLevel(level)
        scratch.cleanup()
    return choices
