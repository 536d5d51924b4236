"""The residual network (DESIGN §2.5): the compact network that computes what a sparse MLP
computes, without its dead neurons and unused inputs.

Liveness comes from the wiring, never from weight values (a connection grown at 0 is still a
connection). The network keeps exactly the neurons that lie on a path from an input feature to
an output -- the fixed point of repeating:

* a hidden neuron without outgoing connections is removed (it influences nothing);
* a hidden neuron without incoming connections outputs the constant ``act(b_i)``: it is folded
  into the next layer's bias, ``b_next += W_next[:, i] · act(b_i)``, and removed;
* an input feature without outgoing connections is dropped; the kept indices are recorded.

It is computed directly, with one forward and one backward reachability pass
(:func:`live_masks`), and the constants are folded level by level.

The result, :class:`ResidualMLP`, takes the original (full) inputs and gives the sparse model's
eval-mode outputs. :func:`save_residual` / :func:`load_residual` store it as
``model.safetensors`` + ``config.json``, loadable without any training state.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import torch
from torch import nn

from synthprune.compact import ResidualSummary, build_from_spec, compact_sequential, is_mlp, module_spec, weight_shapes
from synthprune.files import FileFormatError, atomic_write, load_safetensors, read_json, safetensors_bytes
from synthprune.layers import CSRLinear, DenseLinear, SparseLinear
from synthprune.models import ACTIVATIONS, unwrapped

__all__ = [
    "FORMS", "ResidualMLP", "ResidualSummary", "layer_edges", "live_masks", "load_residual", "residual_network",
    "save_residual",
]

FORMS = ("csr", "dense")
FORMAT = "synthprune-residual"
SEQUENTIAL_FORMAT = "synthprune-residual-sequential"  # a compact CNN (or any sequential model): synthprune.compact


@dataclass
class _Layer:
    """One linear layer as an edge list over the current neuron numbering (CPU, float64 while
    folding so the compact network matches to float tolerance)."""

    rows: torch.Tensor  # [nnz] output neuron of each connection
    cols: torch.Tensor  # [nnz] input neuron of each connection
    values: torch.Tensor  # [nnz]
    bias: torch.Tensor  # [n_out]


class ResidualMLP(nn.Module):
    """``x [batch, ...] -> logits [batch, n_out]``: flatten, keep ``kept_inputs``, then the
    compact layers with the activation between them.

    Attributes:
        kept_inputs: ``LongTensor[k]`` indices (into the flattened input) of the inputs used.
        kept_neurons: per hidden level, the indices its neurons had in the original network
            (what similarity measures compare across runs).
        original_sizes: the widths of the network it was extracted from.
        layers: ``nn.ModuleList`` of :class:`CSRLinear` (form ``"csr"``) or ``nn.Linear``
            (``"dense"``; also any layer with no neuron on one side).
    """

    def __init__(self, n_features: int, kept_inputs: torch.Tensor, sizes: list[int], activation: str,
                 forms: list[str], kept_neurons: list[torch.Tensor] | None = None,
                 original_sizes: list[int] | None = None) -> None:
        super().__init__()
        if len(forms) != len(sizes) - 1 or not set(forms) <= set(FORMS):
            raise ValueError(f"forms must give one of {', '.join(FORMS)} per layer, got {forms}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; valid: {', '.join(ACTIVATIONS)}")
        if len(sizes) < 2 or sizes[0] != kept_inputs.numel():
            raise ValueError(f"sizes {sizes} must start with the number of kept inputs ({kept_inputs.numel()})")
        self.n_features, self.sizes, self.activation_name = n_features, list(sizes), activation
        self.register_buffer("kept_inputs", kept_inputs.clone())
        self.layers = nn.ModuleList(_empty_layer(n_in, n_out, form)
                                    for n_in, n_out, form in zip(sizes[:-1], sizes[1:], forms, strict=True))
        self.forms = [_form(layer) for layer in self.layers]
        self.kept_neurons = [torch.as_tensor(k, dtype=torch.long) for k in kept_neurons] if kept_neurons is not None \
            else [torch.arange(n) for n in sizes[1:-1]]
        if [k.numel() for k in self.kept_neurons] != sizes[1:-1]:
            raise ValueError(f"kept_neurons must list the original index of each hidden neuron, sizes {sizes}")
        self.original_sizes = list(original_sizes) if original_sizes is not None else [n_features, *sizes[1:]]
        self.activation = ACTIVATIONS[activation]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], -1)
        if x.shape[1] != self.n_features:
            raise ValueError(f"expected inputs with {self.n_features} features, got shape {tuple(x.shape)}")
        x = x.index_select(1, self.kept_inputs)
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = self.activation(x)
        return x

    def connections(self) -> list[int]:
        return [_connections(layer) for layer in self.layers]

    def parameters_count(self) -> int:
        return sum(_connections(layer) + layer.out_features for layer in self.layers)

    def config(self) -> dict:
        return {"format": FORMAT, "version": 1, "n_features": self.n_features, "sizes": self.sizes,
                "original_sizes": self.original_sizes,
                "activation": self.activation_name, "forms": self.forms,
                "connections": [_connections(layer) for layer in self.layers]}


def _form(layer: nn.Module) -> str:
    return "csr" if isinstance(layer, SparseLinear) else "dense"


def _connections(layer: nn.Module) -> int:
    return layer.nnz if isinstance(layer, SparseLinear) else layer.weight.numel()


def _empty_layer(n_in: int, n_out: int, form: str) -> nn.Module:
    if form == "dense" or n_in == 0 or n_out == 0:  # a layer with no neurons on a side has no wiring to index
        with warnings.catch_warnings():  # "initializing zero-element tensors": values are filled in after
            warnings.simplefilter("ignore", UserWarning)
            return DenseLinear(n_in, n_out)
    layer = CSRLinear(n_in, n_out, connections=1)
    layer.set_connections(torch.zeros(0, dtype=torch.long), torch.zeros(0))
    return layer


def _mlp_parts(model: nn.Module) -> tuple[list[nn.Module], str]:
    """The linear layers of a sequential MLP and its activation's name; dropout is skipped (the
    residual network is for inference)."""
    if not isinstance(model, nn.Sequential):
        raise ValueError("residual_network needs a SparseMLP (or an nn.Sequential of Flatten, linear layers, "
                         f"activations and dropout), got {type(model).__name__}")
    linears, activations = [], set()
    for name, module in model.named_children():
        if isinstance(module, (SparseLinear, nn.Linear)):
            linears.append(module)
        elif isinstance(module, tuple(ACTIVATIONS.values())):
            activations.add(next(k for k, v in ACTIVATIONS.items() if type(module) is v))
        elif not isinstance(module, (nn.Flatten, nn.Dropout, nn.Identity)):
            raise ValueError(f"residual_network cannot fold module {name!r} ({type(module).__name__})")
    if not linears:
        raise ValueError("the model has no linear layers")
    if len(activations) > 1:
        raise ValueError(f"residual_network needs one activation throughout, found {sorted(activations)}")
    if len(linears) > 1 and not activations:
        raise ValueError("the model has several linear layers but no activation between them")
    return linears, (activations.pop() if activations else "relu")


def layer_edges(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows, cols)`` ``[connections]`` each: the output and input neuron of every connection
    of a sparse or dense linear layer, in row-major (key) order, on the CPU."""
    if isinstance(layer, SparseLinear):
        rows, cols = layer.edge_index().cpu()
        return rows, cols
    rows = torch.arange(layer.out_features).repeat_interleave(layer.in_features)  # dense: every weight
    return rows, torch.arange(layer.in_features).repeat(layer.out_features)


def _edge_list(layer: nn.Module) -> _Layer:
    with torch.no_grad():
        rows, cols = layer_edges(layer)
        weights = layer.connection_values() if isinstance(layer, SparseLinear) else layer.weight.reshape(-1)
        values = weights.detach().cpu()
        bias = layer.bias.detach().cpu() if layer.bias is not None else torch.zeros(layer.out_features)
    return _Layer(rows, cols, values.double(), bias.double().clone())


def live_masks(edges: list[tuple[torch.Tensor, torch.Tensor]], widths: list[int]) -> list[torch.Tensor]:
    """Which neurons the residual network keeps, from the wiring alone.

    ``edges[l] = (rows, cols)`` of linear layer ``l`` (output, input neuron of each connection),
    or ``None`` for a dense layer (every pair connected: nothing to materialise), ``widths`` the
    neurons per level (inputs, hidden..., outputs). A neuron is kept iff it lies
    on a path from an input feature to an output -- the fixed point of removing neurons without
    inputs or outputs. Outputs are always kept. Returns one ``[width]`` bool mask per level.
    """
    return _kept(*_reachability(edges, widths))


def _kept(reached: list[torch.Tensor], reaching: list[torch.Tensor]) -> list[torch.Tensor]:
    """Inputs that reach an output, hidden neurons both reached and reaching, all outputs."""
    return [reaching[0]] + [a & b for a, b in zip(reached[1:-1], reaching[1:-1], strict=True)] + [reaching[-1]]


def _reachability(edges: list[tuple[torch.Tensor, torch.Tensor] | None], widths: list[int]):
    """Per level: neurons reachable from an input feature, and neurons that reach an output."""
    def spread(edge, source: torch.Tensor, width: int, forward: bool) -> torch.Tensor:
        if edge is None:  # dense: all of the next level, if any of this one
            return torch.full((width,), bool(source.any()))
        rows, cols = edge
        ends, starts = (rows, cols) if forward else (cols, rows)
        return torch.bincount(ends[source[starts]], minlength=width) > 0

    reached = [torch.ones(widths[0], dtype=torch.bool)]
    for edge, width in zip(edges, widths[1:], strict=True):
        reached.append(spread(edge, reached[-1], width, forward=True))
    reaching = [torch.ones(widths[-1], dtype=torch.bool)]
    for edge, width in zip(reversed(edges), reversed(widths[:-1]), strict=True):
        reaching.insert(0, spread(edge, reaching[0], width, forward=False))
    return reached, reaching


@torch.no_grad()
def residual_network(model: nn.Module, form: str = "csr", example_input: torch.Tensor | None = None,
                     ) -> tuple[ResidualMLP | nn.Sequential, ResidualSummary]:
    """The compact network of a trained sparse model and what compaction removed.

    A plain MLP (linear layers, activations, dropout) gives a :class:`ResidualMLP`, which also
    drops unused inputs. Any other ``nn.Sequential`` of linear and convolution layers,
    BatchNorm, pooling, activations, dropout and (un)flatten gives a plain ``nn.Sequential``
    (:func:`synthprune.compact.compact_sequential`; ``example_input``, one batch, is needed
    unless the model starts with ``nn.Unflatten``); anything else is refused naming the module.

    ``form="csr"`` makes the sparse linear layers :class:`CSRLinear`; ``"dense"`` makes them
    ``nn.Linear`` (e.g. for ONNX export). Dense layers of the model stay dense. Either gives
    ``model.eval()``'s outputs to float tolerance.
    """
    if form not in FORMS:
        raise ValueError(f"unknown form {form!r}; valid: {', '.join(FORMS)}")
    model = unwrapped(model)
    if not is_mlp(model):
        return compact_sequential(model, example_input, form)
    linears, activation_name = _mlp_parts(model)
    activation = ACTIVATIONS[activation_name]()
    layers = [_edge_list(layer) for layer in linears]
    widths = [linears[0].in_features] + [layer.out_features for layer in linears]
    reached, reaching = _reachability([(layer.rows, layer.cols) for layer in layers], widths)
    alive = _kept(reached, reaching)
    _fold_constants(layers, widths, reached, activation)
    folded = sum(int((~a & b).sum()) for a, b in zip(reached[1:-1], reaching[1:-1], strict=True))
    before = [int(layer.values.numel()) for layer in layers]

    sizes = [int(a.sum()) for a in alive]
    forms = [form if isinstance(layer, SparseLinear) else "dense" for layer in linears]
    kept = [a.nonzero().squeeze(1) for a in alive]
    residual = ResidualMLP(widths[0], kept[0], sizes, activation_name, forms, kept_neurons=kept[1:-1],
                           original_sizes=widths)
    dtype = next(model.parameters()).dtype
    for layer, compact, rows_alive, cols_alive in zip(layers, residual.layers, alive[1:], alive[:-1], strict=True):
        keep = rows_alive[layer.rows] & cols_alive[layer.cols]
        new_row = torch.cumsum(rows_alive, 0) - 1  # old neuron index -> position among the kept
        new_col = torch.cumsum(cols_alive, 0) - 1
        rows, cols = new_row[layer.rows[keep]], new_col[layer.cols[keep]]
        _fill(compact, rows, cols, layer.values[keep].to(dtype), layer.bias[rows_alive].to(dtype))
    residual.eval()
    dense = sum(a * b + b for a, b in pairwise(widths))
    summary = ResidualSummary(
        neurons_before=widths, neurons_after=sizes, connections_before=before,
        connections_after=residual.connections(),
        parameters_before=sum(before) + sum(widths[1:]), parameters_after=residual.parameters_count(),
        dense_parameters=dense, folded_neurons=folded,
    )
    return residual, summary


def _fold_constants(
    layers: list[_Layer], widths: list[int], reached: list[torch.Tensor], activation: nn.Module
) -> None:
    """Fold every hidden neuron that no input reaches into the biases of the next level.

    Such a neuron outputs a constant ``c_i = act(b_i + Σ_j w_ij c_j)`` (its inputs, if any, are
    such constants too), computed level by level; then ``b_k += Σ_i w_ki c_i`` for every neuron
    it feeds. Changes the biases in ``layers`` in place.
    """
    constant = torch.zeros(widths[0], dtype=torch.float64)  # inputs are never constant
    for level, layer in enumerate(layers, start=1):
        moving = ~reached[level - 1][layer.cols]
        layer.bias.index_add_(0, layer.rows[moving], layer.values[moving] * constant[layer.cols[moving]])
        constant = torch.where(reached[level], torch.zeros_like(layer.bias), activation(layer.bias))


def _fill(layer: nn.Module, rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, bias: torch.Tensor) -> None:
    keys = rows * layer.in_features + cols
    layer.to(values.dtype)
    if isinstance(layer, SparseLinear):
        order = torch.argsort(keys)  # CSR order
        layer.set_connections(keys[order], values[order])
    else:
        layer.weight.zero_().view(-1)[keys] = values
    layer.bias.copy_(bias)


def save_residual(residual: ResidualMLP | nn.Sequential, folder: str | Path, extra: dict | None = None) -> Path:
    """Write ``model.safetensors`` and ``config.json`` (sizes, kept inputs, form, ``extra``; or,
    for a compact sequential network, its modules) into ``folder``, atomically; returns it."""
    folder = Path(folder)
    if not isinstance(residual, ResidualMLP):
        tensors = {k: _narrow(v.detach().contiguous().cpu()) for k, v in residual.state_dict().items()}
        atomic_write(folder / "model.safetensors", safetensors_bytes(tensors, metadata={"format": SEQUENTIAL_FORMAT}))
        config = {"format": SEQUENTIAL_FORMAT, "version": 1, "modules": module_spec(residual),
                  "dtype": str(next(t.dtype for t in tensors.values() if t.is_floating_point())).removeprefix("torch.")}
        atomic_write(folder / "config.json", json.dumps({**config, **(extra or {})}, indent=2))
        return folder
    tensors = {k: _narrow(v.detach().contiguous().cpu()) for k, v in residual.state_dict().items()}
    config = residual.config()
    atomic_write(folder / "model.safetensors", safetensors_bytes(tensors, metadata={"format": FORMAT}))
    config["kept_inputs"] = residual.kept_inputs.tolist()
    config["kept_neurons"] = [k.tolist() for k in residual.kept_neurons]
    config["dtype"] = str(next(t.dtype for t in tensors.values() if t.is_floating_point())).removeprefix("torch.")
    atomic_write(folder / "config.json", json.dumps({**config, **(extra or {})}, indent=2))
    return folder


def _narrow(tensor: torch.Tensor) -> torch.Tensor:
    """Index tensors in the smallest integer type that holds them: int16 column indices halve
    a connection's bytes on disk again (4 for the weight + 2 for the index, not 4 + 8)."""
    if tensor.dtype != torch.long or tensor.numel() == 0:
        return tensor
    top = int(tensor.max())
    return tensor.to(torch.int16 if top <= torch.iinfo(torch.int16).max else torch.int32)


def load_residual(path: str | Path, device: str = "cpu") -> ResidualMLP:
    """Load a network written by :func:`save_residual` (or ``synthprune residual``) for
    inference: ``path`` is its folder (or a run directory, meaning ``final/residual``).

    ``config.json`` is checked against the tensors' shapes before anything is built, so a
    damaged or foreign file raises :class:`~synthprune.files.FileFormatError` naming it (never
    a huge allocation, never a network that outputs NaN)."""
    folder = Path(path)
    if not (folder / "config.json").is_file() and (folder / "final" / "residual" / "config.json").is_file():
        folder = folder / "final" / "residual"
    config_path, weights_path = folder / "config.json", folder / "model.safetensors"
    todo = "write it again with `synthprune residual RUN` (or save_residual)"
    config = read_json(config_path, todo)
    if config.get("format") == SEQUENTIAL_FORMAT:
        return _load_sequential(config, config_path, weights_path, todo, device)
    if config.get("format") != FORMAT:
        raise FileFormatError(config_path, f"is not a synthprune residual network (format {config.get('format')!r})",
                              todo)
    tensors, _ = load_safetensors(weights_path, todo, device=device)
    _check_saved(config, tensors, config_path, weights_path, todo)
    tensors = {k: v.long() if not v.is_floating_point() else v for k, v in tensors.items()}
    residual = ResidualMLP(config["n_features"], tensors["kept_inputs"], config["sizes"], config["activation"],
                           config["forms"], config.get("kept_neurons"), config.get("original_sizes"))
    residual.to(tensors["layers.0.bias"].dtype)
    try:
        residual.load_state_dict(tensors)
    except (RuntimeError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0][:200]
        raise FileFormatError(weights_path, f"does not match {config_path.name} ({reason})", todo) from None
    return residual.to(device).eval()


def _load_sequential(config: dict, config_path: Path, weights_path: Path, todo: str, device: str) -> nn.Sequential:
    """A compact sequential network: its module list checked against the tensors' shapes
    before anything is built (a damaged config never allocates more than the file holds)."""
    spec = config.get("modules")
    if not (isinstance(spec, list) and spec and all(isinstance(m, dict) and "type" in m for m in spec)):
        raise FileFormatError(config_path, "modules must be a non-empty list of module descriptions", todo)
    tensors, _ = load_safetensors(weights_path, todo, device="cpu")
    try:
        expected = weight_shapes(spec)
    except (KeyError, TypeError) as exc:
        raise FileFormatError(config_path, f"a module description lacks {exc}", todo) from None
    actual = {k: tuple(v.shape) for k, v in tensors.items()}
    wrong = {k: actual.get(k) for k, shape in expected.items() if k not in actual or (shape and actual[k] != shape)}
    if wrong or set(actual) != set(expected):
        problem = wrong or sorted(set(actual) ^ set(expected))
        raise FileFormatError(weights_path, f"does not match {config_path.name}: {problem}", todo)
    try:
        model = build_from_spec(spec)
        model.to(next(t.dtype for t in tensors.values() if t.is_floating_point()))
        model.load_state_dict({k: v.long() if not v.is_floating_point() else v for k, v in tensors.items()})
    except (RuntimeError, ValueError, TypeError, KeyError) as exc:
        reason = str(exc).strip().splitlines()[0][:200]
        raise FileFormatError(weights_path, f"does not match {config_path.name} ({reason})", todo) from None
    return model.to(device).eval()


def _check_saved(config: dict, tensors: dict[str, torch.Tensor], path: Path, weights: Path, todo: str) -> None:
    """Every size in ``config`` against the saved tensors' shapes (cheap: nothing is built)."""
    def fail(problem: str):
        raise FileFormatError(path, problem, todo)

    def mismatch(problem: str):
        raise FileFormatError(weights, f"does not match {path.name}: {problem}", todo)

    sizes, forms, n_features = config.get("sizes"), config.get("forms"), config.get("n_features")
    if not (isinstance(sizes, list) and len(sizes) >= 2 and all(isinstance(n, int) and n >= 0 for n in sizes)):
        fail(f"sizes must be a list of >= 2 layer widths, got {sizes!r}")
    if not (isinstance(forms, list) and len(forms) == len(sizes) - 1 and set(forms) <= set(FORMS)):
        fail(f"forms must give one of {', '.join(FORMS)} per layer, got {forms!r}")
    if not (isinstance(n_features, int) and n_features >= 1):
        fail(f"n_features must be a positive whole number, got {n_features!r}")
    if config.get("activation") not in ACTIVATIONS:
        fail(f"unknown activation {config.get('activation')!r}")
    for name in ("kept_neurons", "original_sizes"):
        if config.get(name) is not None and not isinstance(config[name], list):
            fail(f"{name} must be a list")
    kept = tensors.get("kept_inputs")
    if kept is None or tuple(kept.shape) != (sizes[0],):
        mismatch(f"kept_inputs {None if kept is None else tuple(kept.shape)}, sizes[0] = {sizes[0]}")
    if kept.numel() and not (int(kept.min()) >= 0 and int(kept.max()) < n_features):
        fail(f"kept_inputs must be input indices below n_features = {n_features}")
    for i, (n_in, n_out, form) in enumerate(zip(sizes[:-1], sizes[1:], forms, strict=True)):
        shapes = {key.removeprefix(f"layers.{i}."): tuple(t.shape) for key, t in tensors.items()
                  if key.startswith(f"layers.{i}.")}
        expected = {"bias": (n_out,)}
        if form == "dense" or n_in == 0 or n_out == 0:
            expected["weight"] = (n_out, n_in)
        else:
            expected["crow_indices"] = (n_out + 1,)
            count = shapes.get("values", (None,))[0]
            expected |= {"values": (count,), "col_indices": (count,)}
        wrong = {k: shapes.get(k) for k, v in expected.items() if shapes.get(k) != v}
        if wrong:
            mismatch(f"layer {i} ({n_in} -> {n_out}, {form}) holds {wrong}, expected "
                     f"{ {k: expected[k] for k in wrong} }")
