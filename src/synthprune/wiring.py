"""A network's wiring as data (DESIGN §2.6): :class:`Structure`, read from a model, a residual
network or a topology snapshot file, and the snapshot files themselves.

A snapshot (``RUN/topology/epoch-NNNN.safetensors``, written by ``train
--save-topology-every``) holds the wiring alone, no weights: one int32/int64 key tensor
``row * n_in + col`` per sparse layer, and the widths and layer names as metadata.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from synthprune.files import FileFormatError, atomic_write, load_safetensors, safetensors_bytes
from synthprune.layers import SparseLinear
from synthprune.residual import ResidualMLP, layer_edges, live_masks

__all__ = ["Structure", "load_snapshot", "model_structure", "residual_structure", "save_snapshot"]

SNAPSHOT_FORMAT = "synthprune-topology"


@dataclass
class Structure:
    """A network's wiring: ``widths`` per level (inputs, hidden..., outputs) and, per linear
    layer, its connections as sorted keys ``row * n_in + col`` in the original numbering."""

    name: str
    widths: list[int]
    keys: list[torch.Tensor]
    sparse: list[bool]  # learnt wiring (SparseLinear) or dense by design
    layer_names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.layer_names:
            self.layer_names = [f"fc{i}" for i in range(1, len(self.keys) + 1)]

    def edges(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        n_in = self.widths[layer]
        return self.keys[layer] // n_in, self.keys[layer] % n_in

    def residual(self) -> Structure:
        """The same structure restricted to neurons on an input-to-output path."""
        alive = live_masks([self.edges(i) for i in range(len(self.keys))], self.widths)
        keys = []
        for i in range(len(self.keys)):
            rows, cols = self.edges(i)
            keys.append(self.keys[i][alive[i + 1][rows] & alive[i][cols]])
        return Structure(self.name, self.widths, keys, self.sparse, self.layer_names)


def model_structure(model: nn.Module, name: str) -> Structure:
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, (SparseLinear, nn.Linear))]
    if not linears:
        raise ValueError(f"{name} has no linear layers")
    widths = [linears[0][1].in_features] + [m.out_features for _, m in linears]
    keys = []
    for _, layer in linears:
        if isinstance(layer, SparseLinear):
            keys.append(layer.keys().cpu())
        else:
            keys.append(torch.arange(layer.in_features * layer.out_features))
    return Structure(name, widths, keys, [isinstance(m, SparseLinear) for _, m in linears], [n for n, _ in linears])


def residual_structure(net: ResidualMLP, name: str) -> Structure:
    """A saved residual network, mapped back to its original neuron numbering."""
    kept = [net.kept_inputs.cpu(), *(k.cpu() for k in net.kept_neurons), torch.arange(net.sizes[-1])]
    widths = list(net.original_sizes)
    keys, sparse = [], []
    for i, layer in enumerate(net.layers):
        rows, cols = layer_edges(layer)
        keys.append(torch.sort(kept[i + 1][rows] * widths[i] + kept[i][cols]).values)
        sparse.append(net.forms[i] == "csr")
    return Structure(name, widths, keys, sparse)


def save_snapshot(model: nn.Module, path: str | Path, epoch: int) -> Path:
    """Write the model's wiring alone (no weights): one int32/int64 key tensor per layer."""
    structure = model_structure(model, "")
    tensors = {}
    for name, keys, sparse, n_in, n_out in zip(structure.layer_names, structure.keys, structure.sparse,
                                               structure.widths[:-1], structure.widths[1:], strict=True):
        if sparse:
            tensors[name] = keys.to(torch.int32 if n_in * n_out < 2**31 else torch.int64).contiguous()
    metadata = {"format": SNAPSHOT_FORMAT, "epoch": str(epoch), "widths": json.dumps(structure.widths),
                "layers": json.dumps(structure.layer_names), "sparse": json.dumps(structure.sparse)}
    path = Path(path)
    atomic_write(path, safetensors_bytes(tensors, metadata=metadata))
    return path


def load_snapshot(path: str | Path) -> Structure:
    """The wiring saved by :func:`save_snapshot`; a damaged or foreign file raises
    :class:`~synthprune.files.FileFormatError` naming it."""
    todo = "pass a snapshot written by train --save-topology-every"
    tensors, metadata = load_safetensors(path, todo)
    if metadata.get("format") != SNAPSHOT_FORMAT:
        raise FileFormatError(path, "is not a synthprune topology snapshot", todo)
    try:
        widths, names, sparse = (json.loads(metadata[k]) for k in ("widths", "layers", "sparse"))
        epoch = int(metadata["epoch"])
    except (KeyError, ValueError) as exc:
        raise FileFormatError(path, f"damaged metadata ({exc.__class__.__name__}: {exc})", todo) from None
    if not (isinstance(widths, list) and all(isinstance(w, int) and w >= 1 for w in widths)
            and isinstance(names, list) and isinstance(sparse, list) and len(names) == len(sparse) == len(widths) - 1):
        raise FileFormatError(path, "damaged metadata (widths, layers and sparse do not fit together)", todo)
    keys = []
    for name, is_sparse, n_in, n_out in zip(names, sparse, widths[:-1], widths[1:], strict=True):
        if not is_sparse:
            keys.append(torch.arange(n_in * n_out))
            continue
        layer_keys = tensors.get(name)
        if layer_keys is None or layer_keys.dim() != 1 or layer_keys.is_floating_point():
            raise FileFormatError(path, f"layer {name!r} has no key tensor", todo)
        layer_keys = layer_keys.long()
        if layer_keys.numel() and (int(layer_keys.min()) < 0 or int(layer_keys.max()) >= n_in * n_out
                                   or not bool((layer_keys.diff() > 0).all())):
            raise FileFormatError(path, f"layer {name!r}: keys are not sorted, unique and below {n_in * n_out}", todo)
        keys.append(layer_keys)
    return Structure(f"{path} (epoch {epoch})", widths, keys, sparse, names)
