"""Building sparse models: :class:`SparseMLP`, :func:`sparsify` for a user's own model, and
:func:`sparse_layers` to find the sparse layers in any module tree."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from itertools import pairwise

import torch
from torch import nn
from torch.nn.modules import module as torch_module  # its global hooks

from synthprune.conv import SparseConv1d, SparseConv2d
from synthprune.layers import (
    CSRLinear,
    DenseLinear,
    Dropout,
    SparseLayer,
    SparseLinear,
    check_backend,
    initial_values,
    keep_dense_weights,
)
from synthprune.topology import er_count, erk_counts, uniform_count

__all__ = [
    "ACTIVATIONS", "CONVOLUTIONS", "DISTRIBUTIONS", "SparseCNN", "SparseMLP", "linear_layers", "sparse_layers",
    "sparsify", "unwrapped", "weight_layers", "weight_slots",
]

ACTIVATIONS = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "elu": nn.ELU,
    "leaky_relu": nn.LeakyReLU,
}
DISTRIBUTIONS = ("er", "uniform", "erk")


def unwrapped(model: nn.Module) -> nn.Module:
    """The module a ``torch.compile`` or ``DistributedDataParallel`` wrapper holds (or ``model``)."""
    model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper: the module it compiled
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def weight_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``[(name, layer)]`` for every sparse or dense linear and convolution layer, in module
    order: the layers whose weights count as connections."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, (SparseLayer, nn.Linear, nn.Conv1d, nn.Conv2d))]


def weight_slots(layer: nn.Module) -> int:
    """Connections a layer would have if dense (a sparse layer's ``n_in·n_out``)."""
    return layer.n_in * layer.n_out if isinstance(layer, SparseLayer) else layer.weight.numel()


def linear_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``[(name, layer)]`` for every sparse and dense linear layer of ``model``, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (SparseLinear, nn.Linear))]


def sparse_layers(model: nn.Module) -> list[tuple[str, SparseLayer]]:
    """``[(name, layer)]`` for every sparse layer (linear or convolution) in ``model``, in
    module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, SparseLayer)]


def layer_counts(
    shapes: Sequence[tuple[int, int]],
    epsilon: float | None,
    density: float | None,
    distribution: str | None,
) -> list[int]:
    """Connections per layer (``shapes`` holds ``(n_in, n_out)``) for a distribution:
    ``er`` (ε per layer, the default with ``epsilon``), ``uniform`` (the same density everywhere,
    the default with ``density``) or ``erk`` (RigL's allocation of a global ``density``)."""
    if (epsilon is None) == (density is None):
        raise ValueError("give exactly one of epsilon (Erdős–Rényi) or density")
    distribution = distribution or ("er" if epsilon is not None else "uniform")
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"unknown distribution {distribution!r}; valid: {', '.join(DISTRIBUTIONS)}")
    if distribution == "er":
        if epsilon is None:
            raise ValueError("distribution 'er' needs epsilon, not density")
        return [er_count(n_in, n_out, epsilon) for n_in, n_out in shapes]
    if density is None:
        raise ValueError(f"distribution {distribution!r} needs density, not epsilon")
    if distribution == "uniform":
        return [uniform_count(n_in, n_out, density) for n_in, n_out in shapes]
    return erk_counts(shapes, density)


def _make_layer(
    n_in: int,
    n_out: int,
    count: int,
    backend: str,
    init: str,
    generator: torch.Generator | None,
    bias: bool = True,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
    keep_sparse: bool = False,
) -> nn.Module:
    """A SparseLinear with ``count`` connections, or an ``nn.Linear`` when ``count`` is the full
    ``n_in·n_out`` (a layer whose density comes out ≥ 1 stays dense) and not ``keep_sparse``.
    Same init either way."""
    if count < n_in * n_out or keep_sparse:
        return SparseLinear(n_in, n_out, connections=count, backend=backend, init=init, bias=bias,
                            generator=generator, device=device, dtype=dtype)
    dense = DenseLinear(n_in, n_out, bias=bias, device=device, dtype=dtype)
    values, bias_values = initial_values(init, count, n_in, n_out, generator, dense.weight.dtype)
    with torch.no_grad():
        dense.weight.copy_(values.view(n_out, n_in))
        if bias:
            dense.bias.copy_(bias_values)
    return dense


class SparseMLP(nn.Sequential):
    """A multilayer perceptron with sparse hidden layers.

    ``SparseMLP([784, 1000, 1000, 1000, 10], epsilon=20)`` builds ``flatten``, then ``fc1..fcN``
    with ``act`` and (if ``dropout > 0``) ``drop`` after every layer but the last. Inputs
    ``[batch, ...]`` are flattened to ``[batch, sizes[0]]``; outputs are ``[batch, sizes[-1]]``
    logits. With ``dense_output`` the last layer is an ordinary ``nn.Linear``; any layer whose
    count reaches ``n_in·n_out`` is dense too, unless ``keep_sparse``: then it is a sparse layer
    holding every connection, which compression can shrink (gradual magnitude pruning from
    dense). Give ``epsilon`` (default 20) or ``density``, not both. ``seed`` makes topology and
    weights reproducible without touching the global RNG.
    """

    def __init__(
        self,
        sizes: Sequence[int],
        *,
        epsilon: float | None = None,
        density: float | None = None,
        distribution: str | None = None,
        backend: str = "csr",
        activation: str = "relu",
        dropout: float = 0.0,
        dense_output: bool = True,
        init: str = "sparse_kaiming",
        seed: int | None = None,
        keep_sparse: bool = False,
    ) -> None:
        sizes = [int(s) for s in sizes]
        if len(sizes) < 2 or min(sizes) < 1:
            raise ValueError(f"sizes must list >= 2 positive layer widths, got {sizes}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; valid: {', '.join(ACTIVATIONS)}")
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        check_backend(backend)
        if epsilon is not None and density is not None:
            raise ValueError("give epsilon (Erdős–Rényi) or density, not both")
        if epsilon is None and density is None:
            epsilon = 20.0
        shapes = list(pairwise(sizes))
        n_sparse = len(shapes) - 1 if dense_output else len(shapes)
        counts = layer_counts(shapes[:n_sparse], epsilon, density, distribution) if n_sparse else []
        counts += [n_in * n_out for n_in, n_out in shapes[n_sparse:]]
        generator = torch.Generator().manual_seed(seed) if seed is not None else None

        modules: OrderedDict[str, nn.Module] = OrderedDict(flatten=nn.Flatten())
        for i, ((n_in, n_out), count) in enumerate(zip(shapes, counts, strict=True), start=1):
            modules[f"fc{i}"] = _make_layer(n_in, n_out, count, backend, init, generator,
                                            keep_sparse=keep_sparse and i <= n_sparse)
            if i < len(shapes):
                modules[f"act{i}"] = ACTIVATIONS[activation]()
                if dropout > 0:
                    modules[f"drop{i}"] = Dropout(dropout)
        super().__init__(modules)
        self.sizes = sizes
        self._settings = {"sizes": sizes, "epsilon": epsilon, "density": density, "distribution": distribution,
                          "backend": backend, "activation": activation, "dropout": dropout,
                          "dense_output": dense_output, "init": init, "keep_sparse": keep_sparse}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The modules in order, except that each csr layer followed by ``nn.ReLU`` (and
        :class:`~synthprune.layers.Dropout`) runs as one fused op where the fast kernel applies
        and none of those modules has hooks: the same results, bit for bit, and the same
        dropout masks, without two passes over the activations each way (the ReLU, dropout and
        their backward were ~0.3-0.5 ms of a ~3 ms step of the reference MLP). The modules stay
        in place for everything that reads the model (residual network, export, hooks)."""
        modules = list(self._modules.values())
        i = 0
        while i < len(modules):
            fused, used = _fused_block(modules, i, x)
            if fused is not None:
                x, i = fused, i + used
            else:
                x, i = modules[i](x), i + 1
        return x

    def config(self) -> dict:
        """The constructor's settings (JSON-safe). ``SparseMLP.from_config(model.config())``
        builds the same architecture; ``load_state_dict`` then restores weights and wiring."""
        return dict(self._settings)

    @classmethod
    def from_config(cls, config: dict, seed: int | None = None) -> SparseMLP:
        settings = dict(config)
        return cls(settings.pop("sizes"), seed=seed, **settings)


def _fused_block(modules: list[nn.Module], i: int, x: torch.Tensor) -> tuple[torch.Tensor | None, int]:
    """``(output, modules used)`` of ``CSRLinear → nn.ReLU [→ Dropout]`` starting at
    ``modules[i]`` as one fused op, or ``(None, 0)`` where that does not apply: another
    pattern, hooks on one of them (they must see each module run), an in-place dropout, or
    an input the fast kernel does not take."""
    layer = modules[i]
    if not isinstance(layer, CSRLinear) or i + 1 >= len(modules) or type(modules[i + 1]) is not nn.ReLU:
        return None, 0
    block = modules[i:i + 2]
    if i + 2 < len(modules) and isinstance(modules[i + 2], Dropout):
        block.append(modules[i + 2])
    if _hooked(block) or (len(block) == 3 and block[2].inplace):
        return None, 0
    p = block[2].p if len(block) == 3 and block[2].training else 0.0
    if not 0 <= p < 1:  # p = 1 drops everything: nn.Dropout's own path
        return None, 0
    return layer.relu_dropout(x, p), len(block)


def _hooked(block: list[nn.Module]) -> bool:
    """Whether any module of ``block`` has forward or backward hooks, or any module has global ones."""
    if any(getattr(torch_module, name, None) for name in (
            "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
            "_global_backward_pre_hooks")):
        return True
    return any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
               for m in block)


class SparseCNN(nn.Sequential):
    """A LeNet-5-like network on ``[batch, H·W]`` (flattened single-channel images) or
    ``[batch, 1, H, W]`` inputs, with sparse convolutions and sparse hidden linear layers.

    ``unflatten``, then per entry of ``channels`` a 5×5 convolution (``conv1..``), the
    activation and 2×2 max pooling; ``flatten``; then ``fc1..fcN`` through ``hidden`` to
    ``n_classes`` as in :class:`SparseMLP`. The first convolution pads by 2 (LeNet-5 on
    28×28); the later ones pad only when the maps are smaller than 8 pixels. Sparsity is
    given as for :func:`sparsify` (``epsilon`` or ``density``); ``dense_output`` keeps the
    last layer dense. ``sizes`` is ``[H·W, *hidden, n_classes]``.
    """

    def __init__(self, image_shape: Sequence[int], n_classes: int, *, channels: Sequence[int] = (6, 16),
                 hidden: Sequence[int] = (120, 84), epsilon: float | None = None, density: float | None = None,
                 distribution: str | None = None, backend: str = "csr", activation: str = "relu",
                 dropout: float = 0.0, dense_output: bool = True, init: str = "sparse_kaiming",
                 seed: int | None = None, sparse: bool = True) -> None:
        height, width = (int(v) for v in image_shape)
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; valid: {', '.join(ACTIVATIONS)}")
        if not channels or min(channels) < 1:
            raise ValueError(f"channels must list >= 1 positive channel counts, got {list(channels)}")
        generator_state = torch.get_rng_state()
        if seed is not None:
            torch.manual_seed(seed)  # the dense layers' own init, before sparsify replaces them
        modules: OrderedDict[str, nn.Module] = OrderedDict(unflatten=nn.Unflatten(1, (1, height, width)))
        side_h, side_w, previous = height, width, 1
        for i, count in enumerate(channels, start=1):
            padding = 2 if i == 1 or min(side_h, side_w) < 8 else 0  # unpadded, it would end below 4
            modules[f"conv{i}"] = nn.Conv2d(previous, count, 5, padding=padding)
            modules[f"act_conv{i}"] = ACTIVATIONS[activation]()
            modules[f"pool{i}"] = nn.MaxPool2d(2)
            side_h, side_w = (side_h + 2 * padding - 4) // 2, (side_w + 2 * padding - 4) // 2
            if min(side_h, side_w) < 1:
                raise ValueError(f"images of {height}x{width} are too small for {len(channels)} convolutions")
            previous = count
        modules["flatten"] = nn.Flatten()
        sizes = [previous * side_h * side_w, *[int(h) for h in hidden], int(n_classes)]
        for i, (n_in, n_out) in enumerate(pairwise(sizes), start=1):
            modules[f"fc{i}"] = nn.Linear(n_in, n_out)
            if i < len(sizes) - 1:
                modules[f"act{i}"] = ACTIVATIONS[activation]()
                if dropout > 0:
                    modules[f"drop{i}"] = Dropout(dropout)
        super().__init__(modules)
        torch.set_rng_state(generator_state)
        if sparse:
            if epsilon is None and density is None:
                epsilon = 20.0
            sparsify(self, epsilon=epsilon, density=density, distribution=distribution, backend=backend,
                     exclude=[f"fc{len(sizes) - 1}"] if dense_output else [], init=init, seed=seed)
        self.sizes = [height * width, *sizes[1:]]


CONVOLUTIONS = {nn.Conv1d: SparseConv1d, nn.Conv2d: SparseConv2d}


def sparsify(
    model: nn.Module,
    *,
    epsilon: float | None = None,
    density: float | None = None,
    distribution: str | None = None,
    backend: str = "csr",
    exclude: Iterable[str] = (),
    init: str = "sparse_kaiming",
    seed: int | None = None,
) -> nn.Module:
    """Replace the ``nn.Linear``, ``nn.Conv1d`` and ``nn.Conv2d`` layers of ``model`` (in
    place) by sparse, rewirable ones: :class:`SparseLinear` on ``backend``, and
    :class:`~synthprune.conv.SparseConv2d` / ``SparseConv1d`` (always masked).

    Give ``epsilon`` (Erdős–Rényi per layer) or ``density`` (``distribution="uniform"`` or
    ``"erk"``); a convolution counts as its ``[C_out, C_in/groups·K]`` weight matrix. ``exclude``
    names layers to leave dense (e.g. the classifier head); a layer whose count reaches its full
    size stays dense. ``init="keep"`` keeps the existing weights at the sampled connections
    (e.g. for a pretrained model); otherwise ``init`` is one of
    :data:`synthprune.layers.INITS`. Returns ``model`` (or the replacement when ``model`` itself
    is one such layer).
    """
    check_backend(backend)
    exclude = set(exclude)
    candidates = [(name, m) for name, m in model.named_modules()
                  if type(m) in (nn.Linear, DenseLinear) or type(m) in CONVOLUTIONS]
    unknown = exclude - {name for name, _ in candidates}
    if unknown:
        raise ValueError(f"exclude names no linear or convolution layer: {sorted(unknown)}; "
                         f"those layers: {[name for name, _ in candidates]}")
    targets = [(name, m) for name, m in candidates if name not in exclude]
    if not targets:
        return model
    shapes = [_matrix_shape(m) for _, m in targets]
    counts = layer_counts(shapes, epsilon, density, distribution)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    for (name, layer), count, (n_in, n_out) in zip(targets, counts, shapes, strict=True):
        if count >= n_in * n_out:
            continue  # density ≥ 1: stays dense
        if type(layer) in CONVOLUTIONS:
            replacement = CONVOLUTIONS[type(layer)].from_dense(layer, connections=count, init=init,
                                                               generator=generator)
        else:
            replacement = _sparse_from_linear(layer, count, backend, init, generator)
        if name == "":
            return replacement
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, replacement)
    return model


def _matrix_shape(layer: nn.Module) -> tuple[int, int]:
    """``(n_in, n_out)`` of a linear layer, or of a convolution's ``[C_out, C_in/groups·K]``."""
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    return layer.weight[0].numel(), layer.out_channels


def _sparse_from_linear(
    linear: nn.Linear, count: int, backend: str, init: str, generator: torch.Generator | None
) -> SparseLinear:
    weight = linear.weight
    layer = SparseLinear(
        linear.in_features, linear.out_features, connections=count, bias=linear.bias is not None,
        backend=backend, init="sparse_kaiming" if init == "keep" else init, generator=generator,
        device=weight.device, dtype=weight.dtype,
    )
    return keep_dense_weights(layer, linear) if init == "keep" else layer

