"""Finished runs: the one home of ``RUN/final/`` -- how a config becomes a model, what a run
is summarised by, writing the final files and loading them back -- and the one definition of a
live neuron. Analysis (plots, similarity, export, sweeps, reports) reads runs through here and
never imports the trainer.

``final/model.safetensors`` holds the model's state dict (weights and wiring) with the config
as metadata; ``final/config.json`` holds ``{"format", "config", "sizes", "summary"}`` and is
written last, so its presence marks a finished run (:meth:`RunDir.is_finished`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from torch import nn

from synthprune.config import TrainConfig, config_from_file
from synthprune.files import FileFormatError, atomic_write, load_safetensors, read_json, safetensors_bytes
from synthprune.layers import SparseLayer, SparseLinear
from synthprune.models import SparseCNN, SparseMLP, linear_layers, weight_layers, weight_slots
from synthprune.residual import layer_edges, live_masks
from synthprune.rundir import RunDir

__all__ = [
    "FINAL_FORMAT", "build_model", "chosen_epoch", "configuration_name", "connections", "live_neurons",
    "load_run_model", "run_name", "summarize", "write_final",
]

FINAL_FORMAT = "synthprune-mlp"


def run_name(configuration: str, seed: int) -> str:
    """The folder name of one run: its configuration's name and its seed (``synthesis-c0.01-s3``).
    The one place run folders are named: ``train``'s default ``--out`` and every sweep."""
    return f"{configuration}-s{seed}"


def configuration_name(config: TrainConfig, prefix: str = "") -> str:
    """A name saying what a config trains: ``[prefix-]<grow or dense>[-c<compress_to>]``."""
    parts = [prefix] if prefix else []
    parts.append(config.grow if config.sparse else "dense")
    if config.compress_to is not None:
        parts.append(f"c{config.compress_to}")
    return "-".join(parts)


def build_model(config: TrainConfig, n_features: int, n_classes: int) -> SparseMLP | SparseCNN:
    """The network of a config (an MLP, or a CNN on square single-channel images of
    ``n_features`` pixels); ``backend="dense"`` gives the same network with every layer dense."""
    sparsity = ({"density": config.density} if config.density is not None else {"epsilon": config.epsilon})
    seed = config.wiring_seed if config.wiring_seed is not None else config.seed  # the initial network
    backend = config.backend if config.sparse else "csr"
    if config.model == "cnn":
        side = math.isqrt(n_features)
        if side * side != n_features:
            raise ValueError(f"model 'cnn' needs square images; this dataset has {n_features} features per example")
        return SparseCNN((side, side), n_classes, channels=config.channels, hidden=config.hidden, **sparsity,
                         backend=backend, activation=config.activation, dropout=config.dropout,
                         dense_output=config.dense_output, init=config.init, seed=seed, sparse=config.sparse)
    sizes = [n_features, *config.hidden, n_classes]
    # A sparse layer at full density stays rewirable when compression will shrink it: gradual
    # magnitude pruning from dense is density 1 + grow none + prune magnitude + compress_to.
    return SparseMLP(sizes, **(sparsity if config.sparse else {"density": 1.0}), backend=backend,
                     activation=config.activation, dropout=config.dropout, dense_output=config.dense_output,
                     init=config.init, seed=seed, keep_sparse=config.sparse and config.compress_to is not None)


def live_neurons(model: nn.Module) -> list[int]:
    """Live neurons per hidden layer: those on a path from an input to an output, the fixed
    point the residual network keeps (:func:`synthprune.residual.live_masks`). The one
    definition used by ``metrics.csv``, run summaries and ``sweep.csv``."""
    layers = [layer for _, layer in linear_layers(model)]
    widths = [layers[0].in_features] + [layer.out_features for layer in layers]
    wiring = [layer_edges(layer) if isinstance(layer, SparseLinear) else None for layer in layers]  # None: dense
    return [int(mask.sum()) for mask in live_masks(wiring, widths)[1:-1]]


def connections(model: nn.Module) -> dict[str, int]:
    """``{layer name: connections}`` for every linear and convolution layer, in order."""
    return {name: (m.nnz if isinstance(m, SparseLayer) else m.weight.numel()) for name, m in weight_layers(model)}


def summarize(metrics: list[dict], model: nn.Module) -> dict:
    """Final and best test accuracy, connections, compression vs dense, seconds per epoch."""
    last = metrics[-1]
    per_layer = {k.removeprefix("connections_"): v for k, v in last.items() if k.startswith("connections_")}
    dense = sum(weight_slots(m) for _, m in weight_layers(model))
    return {
        "epochs": int(last["epoch"]),
        "final_test_accuracy": last["test_accuracy"],
        "best_test_accuracy": max(row["test_accuracy"] for row in metrics),
        **_chosen_on_validation(metrics),
        "connections": int(last["connections"]),
        "connections_per_layer": per_layer,
        "dense_weights": dense,
        "density": last["connections"] / dense,
        "live_neurons": live_neurons(model),
        "seconds_per_epoch": sum(row["epoch_seconds"] for row in metrics) / len(metrics),
    }


def chosen_epoch(metrics: list[dict]) -> dict:
    """The metrics row of the epoch a run's model is chosen at: the best validation accuracy
    (the first of ties), never test. Only epochs that end with the final connection count
    compete: a compressing run delivers a network at its budget, and gradual pruning from dense
    peaks on validation long before it gets there. The one rule for run summaries and the
    experiment reports."""
    final = metrics[-1].get("connections")
    return max((row for row in metrics if row.get("connections") == final), key=lambda row: row["validation_accuracy"])


def _chosen_on_validation(metrics: list[dict]) -> dict:
    """With a validation split: the chosen epoch (:func:`chosen_epoch`) and its test accuracy."""
    if "validation_accuracy" not in metrics[-1]:
        return {}
    best = chosen_epoch(metrics)
    return {"best_validation_accuracy": best["validation_accuracy"], "best_validation_epoch": int(best["epoch"]),
            "test_accuracy_at_best_validation": best["test_accuracy"]}


def write_final(run: RunDir, config: TrainConfig, model: SparseMLP, summary: dict) -> None:
    """``final/model.safetensors``, then ``final/config.json``: the run counts as finished only
    once the second is in place (:meth:`RunDir.is_finished`), so a kill between the two leaves
    a run that ``--resume`` completes from its last checkpoint."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    metadata = {"format": FINAL_FORMAT, "config": json.dumps(config.to_dict())}
    atomic_write(run.final / "model.safetensors", safetensors_bytes(tensors, metadata=metadata))
    final_info = {"format": FINAL_FORMAT, "config": config.to_dict(), "sizes": model.sizes, "summary": summary}
    atomic_write(run.final / "config.json", json.dumps(final_info, indent=2))


def load_run_model(run: str | Path, device: str = "cpu") -> tuple[SparseMLP, TrainConfig]:
    """The final model of a finished run (wiring and weights from ``final/model.safetensors``).
    A missing, damaged or foreign file raises :class:`FileFormatError` naming it."""
    run_dir = RunDir(run)
    if not run_dir.is_finished():
        raise ValueError(f"{run_dir.root} is not a finished run: final/config.json and final/model.safetensors are "
                         f"not both there (an unfinished run? finish it with synthprune train --resume --out "
                         f"{run_dir.root})")
    info_path, weights_path = run_dir.final / "config.json", run_dir.final / "model.safetensors"
    todo = f"train the run again, or resume it after deleting {run_dir.final}"
    info = read_json(info_path, todo)
    sizes = info.get("sizes")
    if not (isinstance(sizes, list) and len(sizes) >= 2 and all(isinstance(n, int) and 0 < n < 2**24 for n in sizes)):
        raise FileFormatError(info_path, f"sizes must be a list of >= 2 layer widths, got {sizes!r}", todo)
    if not isinstance(info.get("config"), dict):
        raise FileFormatError(info_path, "has no config", todo)
    config = config_from_file(info["config"], info_path)
    if config.hidden != sizes[1:-1]:
        raise FileFormatError(info_path, f"sizes {sizes} do not match hidden {config.hidden}", todo)
    tensors, _ = load_safetensors(weights_path, todo, device=device)
    model = build_model(config, sizes[0], sizes[-1])
    try:
        model.load_state_dict(tensors)
    except (RuntimeError, ValueError, KeyError, IndexError) as exc:
        reason = str(exc).strip().splitlines()[0][:200]
        raise FileFormatError(weights_path, f"does not match {info_path.name} ({reason})", todo) from None
    return model.to(device), config
