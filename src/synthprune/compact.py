"""The residual network of a sequential model with convolutions, pooling and BatchNorm
(DESIGN §2.5 beyond MLPs): the same function with dead channels and neurons removed, constant
ones folded, and BatchNorm folded into the layer before it.

The model is an ``nn.Sequential`` (nested ones are flattened) of sparse or dense ``Linear`` /
``Conv2d`` layers (``groups=1``), ``BatchNorm1d``/``BatchNorm2d`` directly after one of them,
activations, dropout, max/average pooling, ``Flatten`` and ``Unflatten``. Anything else is
refused with an error naming the module.

Units are channels between convolutions and features between linear layers; a ``Flatten``
maps channel ``c`` to features ``c·HW .. (c+1)·HW - 1``. From the wiring alone (a connection
grown at 0 still counts):

* a unit no path leads from to an output is removed (it influences nothing);
* a unit no input reaches computes a constant. Feeding a linear layer, it is folded into that
  layer's bias with the value it takes on the example input (any input gives the same value)
  and removed. Feeding a convolution it is kept: zero padding makes a constant map's effect
  depend on the position, which no bias can express;
* BatchNorm (eval statistics) becomes a per-channel scale and shift of the layer before it.

Inputs are all kept (a convolution shares every pixel; input pruning is the MLP path's,
:func:`synthprune.residual.residual_network`). The result is a plain ``nn.Sequential`` of
``nn.Conv2d``, ``nn.Linear`` or :class:`~synthprune.layers.CSRLinear` and the parameter-free
modules, computing ``model.eval()``'s outputs to float tolerance (folding runs in float64).
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from synthprune.conv import SparseConv2d
from synthprune.layers import CSRLinear, SparseLayer, SparseLinear
from synthprune.models import ACTIVATIONS

__all__ = ["ResidualSummary", "build_from_spec", "compact_sequential", "is_mlp", "module_spec", "weight_shapes"]

_WEIGHTED = (SparseLinear, SparseConv2d, nn.Linear, nn.Conv2d)
_CONVOLUTIONS = (SparseConv2d, nn.Conv2d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)
_PASSIVE = (*ACTIVATIONS.values(), nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.MaxPool2d, nn.AvgPool2d,
            nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_MLP_MODULES = (SparseLinear, nn.Linear, nn.Flatten, nn.Dropout, nn.Identity, *ACTIVATIONS.values())


@dataclass
class ResidualSummary:
    """Before/after figures of a residual network (all counts exact): units per level (inputs,
    then each weight layer's outputs: neurons or channels), connections per weight layer."""

    neurons_before: list[int]  # per level: inputs, hidden layers..., outputs
    neurons_after: list[int]
    connections_before: list[int]  # per layer
    connections_after: list[int]
    parameters_before: int  # connections + biases of the sparse model
    parameters_after: int
    dense_parameters: int  # weights + biases of the dense network of the same sizes
    folded_neurons: int  # hidden units no input reaches, folded into the next bias

    def as_dict(self) -> dict:
        return asdict(self)


def is_mlp(model: nn.Module) -> bool:
    """Whether ``model`` is a plain MLP (linear layers, activations, dropout, flatten): the
    residual network's own path, which also drops unused inputs."""
    return isinstance(model, nn.Sequential) and all(isinstance(m, _MLP_MODULES) for _, m in _children(model))


def _children(model: nn.Sequential) -> list[tuple[str, nn.Module]]:
    found = []
    for name, module in model.named_children():
        if isinstance(module, nn.Sequential):
            found += [(f"{name}.{inner}", m) for inner, m in _children(module)]
        else:
            found.append((name, module))
    return found


@dataclass
class _Weight:
    """One weight layer in float64: ``weight`` [out, in] or [out, in, kh, kw], its wiring
    ``mask`` (same shape), ``bias`` [out]; where it sits in the module list."""

    index: int
    module: nn.Module
    weight: torch.Tensor
    mask: torch.Tensor
    bias: torch.Tensor
    sparse: bool

    @property
    def conv(self) -> bool:
        return self.weight.dim() == 4

    def unit_edges(self) -> torch.Tensor:
        """``[out, in]`` bool: which output unit has a connection from which input unit."""
        return self.mask.flatten(2).any(2) if self.conv else self.mask


def _weight(index: int, module: nn.Module) -> _Weight:
    with torch.no_grad():
        if isinstance(module, SparseLayer):
            dense = module.to_dense()
            mask = torch.zeros(dense.weight.numel(), dtype=torch.bool)
            mask[module.keys().cpu()] = True
            weight, mask = dense.weight.detach().cpu().double(), mask.view(dense.weight.shape)
        else:
            if isinstance(module, nn.Conv2d) and (module.groups != 1 or module.padding_mode != "zeros"):
                raise ValueError(f"residual_network handles convolutions with groups=1 and zero padding; module "
                                 f"{index} has groups={module.groups}, padding_mode={module.padding_mode!r}")
            weight = module.weight.detach().cpu().double()
            mask = torch.ones_like(weight, dtype=torch.bool)
        bias = module.bias.detach().cpu().double() if module.bias is not None else torch.zeros(weight.shape[0],
                                                                                               dtype=torch.float64)
    return _Weight(index, module, weight.clone(), mask, bias.clone(), isinstance(module, SparseLayer))


def _fold_norm(layer: _Weight, norm: nn.Module, name: str) -> None:
    """Fold an eval-mode BatchNorm into the layer before it: ``γ(Wx + b - μ)/σ + β``."""
    if norm.running_mean is None:
        raise ValueError(f"residual_network cannot fold BatchNorm {name!r} without running statistics "
                         "(track_running_stats=False)")
    with torch.no_grad():
        scale = 1.0 / torch.sqrt(norm.running_var.double() + norm.eps)
        if norm.affine:
            scale = scale * norm.weight.double()
        shift = -norm.running_mean.double() * scale + (norm.bias.double() if norm.affine else 0.0)
    if scale.numel() != layer.weight.shape[0]:
        raise ValueError(f"BatchNorm {name!r} has {scale.numel()} features but the layer before it has "
                         f"{layer.weight.shape[0]} outputs")
    layer.weight *= scale.view(-1, *[1] * (layer.weight.dim() - 1))
    layer.bias = layer.bias * scale + shift


@torch.no_grad()
def compact_sequential(model: nn.Module, example_input: torch.Tensor | None = None,
                       form: str = "csr") -> tuple[nn.Sequential, ResidualSummary]:
    """The residual network of ``model`` (see the module docstring) and what compaction did.

    ``example_input``: one input batch, needed unless the model starts with ``nn.Unflatten``
    (then a zero batch of the flattened size is used). ``form="csr"`` keeps the originally
    sparse linear layers as :class:`CSRLinear`; ``"dense"`` makes every layer dense."""
    if not isinstance(model, nn.Sequential):
        raise ValueError(f"residual_network needs an nn.Sequential, got {type(model).__name__}")
    named = _children(model)
    modules = [m for _, m in named]
    for name, module in named:
        if not isinstance(module, (*_WEIGHTED, *_NORMS, *_PASSIVE, nn.Flatten, nn.Unflatten)):
            raise ValueError(f"residual_network cannot handle module {name!r} ({type(module).__name__}); it "
                             "handles linear and Conv2d layers, BatchNorm after them, activations, dropout, "
                             "pooling, Flatten and Unflatten")
    example = _example(modules, example_input)
    inputs = _record_inputs(model, modules, example)
    weights: list[_Weight] = []
    for i, (name, module) in enumerate(named):
        if isinstance(module, _WEIGHTED):
            weights.append(_weight(i, module))
        elif isinstance(module, _NORMS):
            if not weights or weights[-1].index != i - 1:
                raise ValueError(f"residual_network folds BatchNorm only directly after a linear or convolution "
                                 f"layer; {name!r} follows {type(modules[i - 1]).__name__ if i else 'nothing'}")
            _fold_norm(weights[-1], module, name)
    if not weights:
        raise ValueError("the model has no linear or convolution layers")

    # Levels: the input of each weight layer, in its own units (channels or features), and the
    # map from the previous weight layer's output units (a Flatten in between repeats channels).
    repeat = [_units_between(modules, weights[k - 1].index, weights[k].index, inputs[weights[k].index],
                             weights[k - 1].weight.shape[0]) for k in range(1, len(weights))]
    reached = [torch.ones(weights[0].weight.shape[1], dtype=torch.bool)]  # inputs: all reached
    outs_reached = []
    for k, layer in enumerate(weights):
        out = (layer.unit_edges() & reached[-1][None, :]).any(1)
        outs_reached.append(out)
        if k + 1 < len(weights):
            reached.append(out.repeat_interleave(repeat[k]))
    reaching_out = [torch.ones(weights[-1].weight.shape[0], dtype=torch.bool)]  # outputs: all kept
    for k in range(len(weights) - 1, 0, -1):
        into = (weights[k].unit_edges() & reaching_out[0][:, None]).any(0)
        reaching_out.insert(0, into.view(-1, repeat[k - 1]).any(1))

    # Keep a hidden unit that reaches an output and is reached, or that is a constant feeding a
    # convolution (not foldable); fold the other reaching constants into the next linear layer.
    keep_out, folded = [], 0
    for k in range(len(weights)):
        if k == len(weights) - 1:
            keep_out.append(torch.ones_like(reaching_out[k]))
            continue
        constant_kept = weights[k + 1].conv
        keep = reaching_out[k] & (outs_reached[k] | constant_kept)
        folded += int((reaching_out[k] & ~outs_reached[k] & ~keep).sum())
        keep_out.append(keep)
    built: list[nn.Module] = []
    connections_after: list[int] = []
    dtype = next(model.parameters()).dtype
    for k, layer in enumerate(weights):
        rows = keep_out[k]
        cols = (keep_out[k - 1].repeat_interleave(repeat[k - 1]) if k else
                torch.ones(layer.weight.shape[1], dtype=torch.bool))
        weight, mask, bias = layer.weight, layer.mask, layer.bias.clone()
        if not layer.conv and k > 0:  # constants (units no input reaches) feeding a linear layer: into its bias
            value = inputs[layer.index].double().reshape(-1)
            constant = ~cols & ~reached[k]
            bias += (weight[:, constant] * value[constant]).sum(1)
        kept_mask = mask[rows][:, cols]
        built.append(_compact_layer(layer, weight[rows][:, cols], kept_mask, bias[rows], form, dtype))
        connections_after.append(int(kept_mask.sum()))
    layers = _assemble(modules, weights, built)
    layers.eval()
    neurons_before = [weights[0].weight.shape[1]] + [w.weight.shape[0] for w in weights]
    neurons_after = [weights[0].weight.shape[1]] + [int(k.sum()) for k in keep_out]
    connections_before = [int(w.mask.sum()) for w in weights]
    summary = ResidualSummary(
        neurons_before=neurons_before, neurons_after=neurons_after, connections_before=connections_before,
        connections_after=connections_after,
        parameters_before=sum(connections_before) + sum(w.bias.numel() for w in weights),
        parameters_after=sum(connections_after) + sum(int(k.sum()) for k in keep_out),
        dense_parameters=sum(w.weight.numel() + w.bias.numel() for w in weights), folded_neurons=folded)
    return layers, summary


def _example(modules: list[nn.Module], example_input: torch.Tensor | None) -> torch.Tensor:
    if example_input is not None:
        return example_input[:1]
    first = modules[0]
    if isinstance(first, nn.Unflatten):
        return torch.zeros(1, math.prod(first.unflattened_size))
    if isinstance(first, (nn.Linear, SparseLinear)):
        return torch.zeros(1, first.in_features)
    raise ValueError("residual_network needs example_input= (one input batch) for a model that starts with a "
                     f"{type(first).__name__}")


def _record_inputs(model: nn.Module, modules: list[nn.Module], example: torch.Tensor) -> dict[int, torch.Tensor]:
    """The input each weight layer sees on ``example`` (eval mode), by module position."""
    seen: dict[int, torch.Tensor] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args, i=i: seen.__setitem__(i, args[0].detach().cpu()))
             for i, m in enumerate(modules) if isinstance(m, _WEIGHTED)]
    training = model.training
    try:
        model.eval()
        parameter = next(model.parameters())
        model(example.to(parameter.device, parameter.dtype))
    finally:
        model.train(training)
        for hook in hooks:
            hook.remove()
    return seen


def _units_between(modules: list[nn.Module], before: int, after: int, seen: torch.Tensor, units: int) -> int:
    """How many input units of the weight layer at ``after`` each output unit of the one at
    ``before`` becomes: 1, or ``H·W`` through a Flatten. Refuses shapes it cannot map."""
    between = modules[before + 1 : after]
    per_sample = seen[0].numel()
    if any(isinstance(m, nn.Unflatten) for m in between):
        raise ValueError(f"residual_network cannot follow an Unflatten between module {before} and {after}")
    if per_sample % units:
        raise ValueError(f"module {after} sees {per_sample} values per example, not a multiple of the "
                         f"{units} units before it")
    if isinstance(modules[after], _CONVOLUTIONS):
        return 1
    return per_sample // units


def _compact_layer(layer: _Weight, weight: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor, form: str,
                   dtype: torch.dtype) -> nn.Module:
    weight = torch.where(mask, weight, torch.zeros_like(weight))
    if layer.conv:
        source = layer.module
        conv = nn.Conv2d(weight.shape[1], weight.shape[0], source.kernel_size, source.stride, source.padding,
                         source.dilation, bias=True, dtype=dtype)
        conv.weight.data.copy_(weight)
        conv.bias.data.copy_(bias)
        return conv
    n_out, n_in = weight.shape
    if form == "csr" and layer.sparse and n_out and n_in:
        linear = CSRLinear(n_in, n_out, connections=1, dtype=dtype)
        keys = mask.reshape(-1).nonzero().squeeze(1)
        linear.set_connections(keys, weight.reshape(-1)[keys].to(dtype))
        linear.bias.data.copy_(bias)
        return linear
    linear = nn.Linear(n_in, n_out, dtype=dtype)
    linear.weight.data.copy_(weight)
    linear.bias.data.copy_(bias)
    return linear


def _assemble(modules: list[nn.Module], weights: list[_Weight], built: list[nn.Module]) -> nn.Sequential:
    """The compact modules in the original order: weight layers replaced, BatchNorm gone,
    everything else copied."""
    replacement = {w.index: b for w, b in zip(weights, built, strict=True)}
    ordered = []
    for i, module in enumerate(modules):
        if i in replacement:
            ordered.append(replacement[i])
        elif not isinstance(module, _NORMS):
            ordered.append(copy.deepcopy(module))
    return nn.Sequential(*ordered)


# --------------------------------------------------------------------------- saving and loading

_SIMPLE = {"Identity": nn.Identity, "Flatten": nn.Flatten, "Unflatten": nn.Unflatten, "Dropout": nn.Dropout,
           "Dropout1d": nn.Dropout1d, "Dropout2d": nn.Dropout2d, "MaxPool2d": nn.MaxPool2d,
           "AvgPool2d": nn.AvgPool2d, "AdaptiveAvgPool2d": nn.AdaptiveAvgPool2d,
           "AdaptiveMaxPool2d": nn.AdaptiveMaxPool2d, **{cls.__name__: cls for cls in ACTIVATIONS.values()}}
_ARGUMENTS = {  # what rebuilds each parameter-free module
    "Flatten": ("start_dim", "end_dim"), "Unflatten": ("dim", "unflattened_size"), "Dropout": ("p",),
    "Dropout1d": ("p",), "Dropout2d": ("p",), "MaxPool2d": ("kernel_size", "stride", "padding", "dilation",
                                                             "ceil_mode"),
    "AvgPool2d": ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad"),
    "AdaptiveAvgPool2d": ("output_size",), "AdaptiveMaxPool2d": ("output_size",), "LeakyReLU": ("negative_slope",),
    "ELU": ("alpha",), "GELU": ("approximate",),
}


def module_spec(model: nn.Sequential) -> list[dict]:
    """A JSON-safe description of a compact network's modules (:func:`build_from_spec`
    rebuilds it; the weights come from the state dict)."""
    spec = []
    for module in model:
        kind = type(module).__name__
        if isinstance(module, CSRLinear):
            spec.append({"type": "CSRLinear", "in": module.in_features, "out": module.out_features})
        elif type(module) is nn.Linear:
            spec.append({"type": "Linear", "in": module.in_features, "out": module.out_features})
        elif type(module) is nn.Conv2d:
            spec.append({"type": "Conv2d", "in": module.in_channels, "out": module.out_channels,
                         "kernel_size": list(module.kernel_size), "stride": list(module.stride),
                         "padding": module.padding if isinstance(module.padding, str) else list(module.padding),
                         "dilation": list(module.dilation)})
        elif kind in _SIMPLE:
            spec.append({"type": kind, **{name: _plain(getattr(module, name)) for name in _ARGUMENTS.get(kind, ())}})
        else:
            raise ValueError(f"cannot describe module {kind} of a compact network")
    return spec


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def weight_shapes(spec: list[dict]) -> dict[str, tuple[int, ...] | None]:
    """The state-dict shapes ``spec`` implies (``None``: a CSR layer's, known from its values)."""
    shapes: dict[str, tuple[int, ...] | None] = {}
    for i, item in enumerate(spec):
        if item["type"] == "Linear":
            shapes |= {f"{i}.weight": (item["out"], item["in"]), f"{i}.bias": (item["out"],)}
        elif item["type"] == "Conv2d":
            shapes |= {f"{i}.weight": (item["out"], item["in"], *item["kernel_size"]), f"{i}.bias": (item["out"],)}
        elif item["type"] == "CSRLinear":
            shapes |= {f"{i}.values": None, f"{i}.col_indices": None, f"{i}.crow_indices": (item["out"] + 1,),
                       f"{i}.bias": (item["out"],)}
    return shapes


def build_from_spec(spec: list[dict]) -> nn.Sequential:
    """Empty modules for ``spec`` (check :func:`weight_shapes` against the tensors first)."""
    modules = []
    for item in spec:
        kind, args = item["type"], {k: v for k, v in item.items() if k != "type"}
        if kind == "CSRLinear":
            layer = CSRLinear(args["in"], args["out"], connections=1)
            layer.set_connections(torch.zeros(0, dtype=torch.long), torch.zeros(0))
            modules.append(layer)
        elif kind == "Linear":
            modules.append(nn.Linear(args["in"], args["out"]))
        elif kind == "Conv2d":
            modules.append(nn.Conv2d(args["in"], args["out"], tuple(args["kernel_size"]), tuple(args["stride"]),
                                     args["padding"] if isinstance(args["padding"], str) else tuple(args["padding"]),
                                     tuple(args["dilation"])))
        elif kind in _SIMPLE:
            modules.append(_SIMPLE[kind](**{k: tuple(v) if isinstance(v, list) else v for k, v in args.items()}))
        else:
            raise ValueError(f"unknown module type {kind!r}")
    return nn.Sequential(*modules)
