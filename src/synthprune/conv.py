"""Sparse, rewirable convolutions: :class:`SparseConv1d` and :class:`SparseConv2d`.

A connection is one weight element. The Rewirer sees the weight ``[C_out, C_in/groups, *k]``
as the matrix ``[C_out, C_in/groups · K]`` (``K`` kernel positions): row = output channel,
column ``c·K + p`` = input channel ``c`` at kernel position ``p``, so a key is the flat index
into the weight and every prune criterion, grow strategy and compression rule works on a
convolution as on a linear layer, with the same exact-count invariants.

The backend is ``masked`` (a dense ``weight`` and a boolean ``mask``, absent weights held at
exactly 0): convolutions are small and compute-bound, and PyTorch has no sparse convolution
kernel that beats a dense one on CPU at these densities. Inputs and outputs are those of
``nn.Conv1d`` / ``nn.Conv2d``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from synthprune.layers import MaskedConnections, initial_values, keep_dense_weights, resolve_count
from synthprune.topology import random_keys

__all__ = ["SparseConv1d", "SparseConv2d", "SparseConvNd"]


class SparseConvNd(MaskedConnections):
    """A convolution with a sparse, rewirable set of weights (masked backend). Built from the
    same arguments as ``nn.ConvNd`` plus the sparsity (one of ``epsilon``, ``density``,
    ``connections``; ε counts the layer as its ``[C_out, C_in/groups·K]`` matrix)."""

    dims: int = 0
    _conv = None

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, ...],
        stride: int | tuple[int, ...] = 1,
        padding: int | tuple[int, ...] | str = 0,
        dilation: int | tuple[int, ...] = 1,
        groups: int = 1,
        bias: bool = True,
        *,
        epsilon: float | None = None,
        density: float | None = None,
        connections: int | None = None,
        init: str = "sparse_kaiming",
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if in_channels < 1 or out_channels < 1 or groups < 1:
            raise ValueError(f"channels and groups must be >= 1, got in={in_channels}, out={out_channels}, "
                             f"groups={groups}")
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"in_channels ({in_channels}) and out_channels ({out_channels}) must be divisible "
                             f"by groups ({groups})")
        self.in_channels, self.out_channels, self.groups = int(in_channels), int(out_channels), int(groups)
        self.kernel_size = _tuple(kernel_size, self.dims, "kernel_size")
        self.stride, self.dilation = _tuple(stride, self.dims, "stride"), _tuple(dilation, self.dims, "dilation")
        self.padding = padding if isinstance(padding, str) else _tuple(padding, self.dims, "padding")
        self.kernel_positions = math.prod(self.kernel_size)
        n_in, n_out = in_channels // groups * self.kernel_positions, out_channels
        dtype = dtype or torch.get_default_dtype()
        count = resolve_count(n_in, n_out, epsilon, density, connections)
        keys = random_keys(n_in * n_out, count, generator or torch.default_generator)
        values, bias_values = initial_values(init, count, n_in, n_out, generator, dtype)
        shape = (out_channels, in_channels // groups, *self.kernel_size)
        self.weight = nn.Parameter(torch.zeros(shape, dtype=dtype, device=device))
        self.register_buffer("mask", torch.zeros(shape, dtype=torch.bool, device=device))
        self.bias = nn.Parameter(bias_values.to(device)) if bias else None
        with torch.no_grad():
            self.set_connections(keys, values)

    n_in = property(lambda self: self.in_channels // self.groups * self.kernel_positions)
    n_out = property(lambda self: self.out_channels)

    @classmethod
    def from_dense(cls, conv: nn.Module, *, connections: int, init: str = "sparse_kaiming",
                   generator: torch.Generator | None = None) -> SparseConvNd:
        """A sparse copy of an ``nn.ConvNd``'s geometry with ``connections`` weights;
        ``init="keep"`` keeps its weights (and bias) at the sampled connections."""
        if conv.padding_mode != "zeros":
            raise ValueError(f"sparse convolutions support padding_mode='zeros' only, not {conv.padding_mode!r}")
        weight = conv.weight
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                    conv.groups, conv.bias is not None, connections=connections,
                    init="sparse_kaiming" if init == "keep" else init, generator=generator,
                    device=weight.device, dtype=weight.dtype)
        return keep_dense_weights(layer, conv) if init == "keep" else layer

    def weight_gradient(self, inputs: torch.Tensor, grad_outputs: torch.Tensor) -> torch.Tensor:
        """The dense ``∂L/∂W`` ``[C_out, C_in/groups·K]`` at every slot, present or not, from
        the layer's input and output gradient (one weight-gradient convolution)."""
        grad = getattr(torch.nn.grad, f"conv{self.dims}d_weight")(
            inputs, self.weight.shape, grad_outputs, self.stride, self._padding_numbers(), self.dilation, self.groups)
        return grad.reshape(self.n_out, self.n_in)

    def _padding_numbers(self) -> tuple[int, ...]:
        if not isinstance(self.padding, str):
            return self.padding
        if self.padding == "valid":
            return (0,) * self.dims
        # "same" with stride 1: total padding d·(k-1) per side pair; torch pads the extra on the right,
        # which the weight-gradient convolution cannot express, so odd totals are refused here.
        totals = [d * (k - 1) for d, k in zip(self.dilation, self.kernel_size, strict=True)]
        if any(t % 2 for t in totals):
            raise ValueError("gradient growth on a padding='same' convolution needs odd kernel sizes")
        return tuple(t // 2 for t in totals)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv(x, self.weight * self.mask, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def to_dense(self) -> nn.Module:
        """An ``nn.ConvNd`` with the same function (absent weights are 0)."""
        dense = getattr(nn, f"Conv{self.dims}d")(
            self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding, self.dilation,
            self.groups, self.bias is not None, device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            dense.weight.copy_(self.weight * self.mask)
            if self.bias is not None:
                dense.bias.copy_(self.bias)
        return dense

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, nnz={self.nnz}, density={self.density:.2%}, bias={self.bias is not None}")


class SparseConv1d(SparseConvNd):
    """A sparse ``nn.Conv1d``: inputs ``[B, C_in, L]``, outputs ``[B, C_out, L']``."""

    dims = 1
    _conv = staticmethod(F.conv1d)


class SparseConv2d(SparseConvNd):
    """A sparse ``nn.Conv2d``: inputs ``[B, C_in, H, W]``, outputs ``[B, C_out, H', W']``."""

    dims = 2
    _conv = staticmethod(F.conv2d)


def _tuple(value: int | tuple[int, ...], dims: int, name: str) -> tuple[int, ...]:
    values = (value,) * dims if isinstance(value, int) else tuple(value)
    if len(values) != dims or not all(isinstance(v, int) and v >= 0 for v in values):
        raise ValueError(f"{name} must be a non-negative int or {dims} of them, got {value!r}")
    return values
