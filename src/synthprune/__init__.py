"""synthprune: sparse feedforward networks whose wiring evolves while they learn.

Strategic synthesis and pruning (Finlinson & Moschoyiannis 2020) beside SET, RigL and dense
baselines, on PyTorch. The public API::

    model = synthprune.SparseMLP([784, 1000, 1000, 1000, 10], epsilon=20, backend="csr")
    rewirer = synthprune.Rewirer(model, optimizer, prune="set", grow="synthesis", zeta=0.3)
    ...  # train; after each epoch:
    rewirer.step()                       # or rewirer.maybe_step(step) with a RewireSchedule

Convolutions: ``sparsify(model, density=0.2)`` makes ``nn.Conv2d``/``nn.Conv1d`` sparse too.
Your own loop: ``save_checkpoint``/``load_checkpoint``, ``rewire_ddp`` under DDP, and
``synthprune.lightning.Rewiring`` for Lightning. Deployment: ``export_onnx(net, path)``.
"""

import os as _os
import sys as _sys

# The command line sets a passive OpenMP wait policy before torch (and its OpenMP runtime, which
# reads the variable once, when it loads) starts, unless the user chose one. Spinning threads
# collapse a sparse step when another process shares the cores: measured 88.5 ms against 5.1
# ms for one thread (benchmarks/README.md). Library users set it themselves (README, Threads).
if (_sys.argv[:1] == ["-m"] or _os.path.basename(_sys.argv[0] if _sys.argv else "") == "synthprune") \
        and "torch" not in _sys.modules:
    _os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from synthprune.checkpoint import load_checkpoint, save_checkpoint
from synthprune.conv import SparseConv1d, SparseConv2d
from synthprune.distributed import rewire_ddp
from synthprune.layers import BACKENDS, CSRLinear, MaskedLinear, SparseLayer, SparseLinear
from synthprune.models import SparseMLP, sparse_layers, sparsify
from synthprune.residual import ResidualMLP, ResidualSummary, load_residual, residual_network, save_residual
from synthprune.rewiring import LayerReport, Rewirer
from synthprune.runs import load_run_model
from synthprune.schedules import RewireSchedule
from synthprune.strategies import list_strategies, register_grow, register_prune
from synthprune.topology import TopologyError

__version__ = "0.1.0"

_COMPARE = ("similarity", "similarity_matrix")  # from synthprune.compare, imported on first use (scipy)
_EXPORT = ("export_onnx",)  # from synthprune.export, imported on first use


def __getattr__(name: str):
    if name in _COMPARE:
        from synthprune import compare

        return getattr(compare, name)
    if name in _EXPORT:
        from synthprune import export

        return getattr(export, name)
    raise AttributeError(f"module 'synthprune' has no attribute {name!r}")


__all__ = [
    "BACKENDS",
    "CSRLinear",
    "LayerReport",
    "MaskedLinear",
    "ResidualMLP",
    "ResidualSummary",
    "RewireSchedule",
    "Rewirer",
    "SparseConv1d",
    "SparseConv2d",
    "SparseLayer",
    "SparseLinear",
    "SparseMLP",
    "TopologyError",
    "__version__",
    "export_onnx",
    "list_strategies",
    "load_checkpoint",
    "load_residual",
    "load_run_model",
    "register_grow",
    "register_prune",
    "residual_network",
    "rewire_ddp",
    "save_checkpoint",
    "save_residual",
    "similarity",
    "similarity_matrix",
    "sparse_layers",
    "sparsify",
]
