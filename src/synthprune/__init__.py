"""synthprune: sparse feedforward networks whose wiring evolves while they learn.

Strategic synthesis and pruning (Finlinson & Moschoyiannis 2020) beside SET, RigL and dense
baselines, on PyTorch. The public API::

    model = synthprune.SparseMLP([784, 1000, 1000, 1000, 10], epsilon=20, backend="csr")
    rewirer = synthprune.Rewirer(model, optimizer, prune="set", grow="synthesis", zeta=0.3)
    ...  # train; after each epoch:
    rewirer.step()
"""

from synthprune.layers import BACKENDS, CSRLinear, MaskedLinear, SparseLinear
from synthprune.models import SparseMLP, sparse_layers, sparsify
from synthprune.residual import ResidualMLP, ResidualSummary, load_residual, residual_network, save_residual
from synthprune.rewiring import LayerReport, Rewirer
from synthprune.runs import load_run_model
from synthprune.strategies import list_strategies, register_grow, register_prune
from synthprune.topology import TopologyError

__version__ = "0.1.0"

_COMPARE = ("similarity", "similarity_matrix")  # from synthprune.compare, imported on first use (scipy)


def __getattr__(name: str):
    if name in _COMPARE:
        from synthprune import compare

        return getattr(compare, name)
    raise AttributeError(f"module 'synthprune' has no attribute {name!r}")


__all__ = [
    "BACKENDS",
    "CSRLinear",
    "LayerReport",
    "MaskedLinear",
    "ResidualMLP",
    "ResidualSummary",
    "Rewirer",
    "SparseLinear",
    "SparseMLP",
    "TopologyError",
    "__version__",
    "list_strategies",
    "load_residual",
    "load_run_model",
    "register_grow",
    "register_prune",
    "residual_network",
    "save_residual",
    "similarity",
    "similarity_matrix",
    "sparse_layers",
    "sparsify",
]
