"""How many threads a training process uses when nobody said: enough for its work, no more.

A training step of a sparse network is many small pieces of work (a product per layer, then
activations, their gradients, the optimizer's update), and every piece that torch splits
between threads pays to wake them. Measured on this project's 2-core machine (reference MLP,
ε = 20, batch 128, passive OpenMP wait policy; benchmarks/README.md):

- csr: 1 thread 4.8-6.0 ms a step, 2 threads 9.7-11.1 ms on an idle machine; 9.5-10.1 against
  20.0-20.7 ms when other processes keep the cores busy. Two threads never paid.
- dense: 1 thread 30-35 ms, 2 threads 22 ms idle; 48-56 against 33-52 ms under load.

So the default is one thread per ``MULTIPLY_ADDS_PER_THREAD`` multiply-adds of a forward pass
(at least 1, at most the cores): the csr reference MLP (16 M) gets 1 thread, its dense
counterpart (358 M) every core, a csr MLP 16,000 wide (227 M) 4. Convolutions count as
their dense work per output position is unknown here: they get every core.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from synthprune.conv import SparseConvNd
from synthprune.layers import CSRLinear, SparseLinear

MULTIPLY_ADDS_PER_THREAD = 50_000_000  # the work that pays for one more thread (see above)


def forward_multiply_adds(model: nn.Module, batch: int) -> int | None:
    """Multiply-adds of one forward pass over ``batch`` examples through the model's linear
    layers (a csr layer: its connections; any other: its dense weight), or ``None`` when the
    model has convolutions, whose work depends on the size of their inputs."""
    total = 0
    for module in model.modules():
        if isinstance(module, (nn.modules.conv._ConvNd, SparseConvNd)):
            return None
        if isinstance(module, CSRLinear):
            total += module.nnz * batch
        elif isinstance(module, (nn.Linear, SparseLinear)):  # dense, or masked (a dense product)
            total += module.in_features * module.out_features * batch
    return total


def suggested_threads(model: nn.Module, batch: int, cores: int | None = None) -> int:
    """The thread count for training ``model`` at ``batch``: one per
    ``MULTIPLY_ADDS_PER_THREAD`` of its forward pass, between 1 and ``cores`` (default: this
    machine's)."""
    cores = cores or os.cpu_count() or 1
    work = forward_multiply_adds(model, batch)
    if work is None:
        return cores
    return max(1, min(cores, round(work / MULTIPLY_ADDS_PER_THREAD)))


def apply_default_threads(model: nn.Module, batch: int) -> int | None:
    """Set torch's thread count to :func:`suggested_threads` unless the user chose one
    (``OMP_NUM_THREADS`` in the environment); returns the count set, or ``None``."""
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    threads = suggested_threads(model, batch)
    torch.set_num_threads(threads)
    return threads
