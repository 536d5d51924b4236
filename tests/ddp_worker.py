"""A torchrun worker for tests/test_distributed.py (not collected by pytest: no test_ prefix).

``torchrun --nproc_per_node=2 tests/ddp_worker.py OUT``: for every backend × grow strategy ×
(fixed budget, compression) it trains a small DDP model on rank-dependent data, rewires after
every few batches from the same batch on every rank, and records each rank's digests after every
step in ``OUT/rank-<r>.json``; ``check_synchronized`` must pass each time. Last, it perturbs
one rank's weights and records the error ``check_synchronized`` raises.
"""

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from synthprune import distributed
from synthprune.layers import BACKENDS
from synthprune.models import SparseMLP
from synthprune.rewiring import Rewirer
from synthprune.strategies import list_strategies

SIZES = [20, 24, 24, 5]
STEPS = 4


def scenario(backend: str, grow: str, compress: bool, ranks: distributed.Ranks) -> list[dict]:
    torch.manual_seed(0)
    model = SparseMLP(SIZES, epsilon=3.0, backend=backend, seed=7)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    options = {"compress_to": 0.15, "compress_start": 1, "compress_end": STEPS - 1} if compress else {}
    rewirer = Rewirer(model, optimizer, grow=grow, zeta=0.3, total_steps=STEPS, seed=3, **options)
    net = distributed.wrap(model, ranks, torch.device("cpu"))
    data = torch.Generator().manual_seed(100 + ranks.rank)  # every rank its own examples
    digests = []
    for _ in range(STEPS):
        for _ in range(3):
            x, y = torch.randn(16, SIZES[0], generator=data), torch.randint(0, SIZES[-1], (16,), generator=data)
            optimizer.zero_grad()
            F.cross_entropy(net(x), y).backward()
            optimizer.step()
        shared = torch.Generator().manual_seed(len(digests))  # the same rewiring batch everywhere
        batch = torch.randn(32, SIZES[0], generator=shared), torch.randint(0, SIZES[-1], (32,), generator=shared)
        net = distributed.unwrap(net)
        rewirer.step(batch=batch)
        digests.append(distributed.check_synchronized(model, optimizer, ranks, "in the test"))
        net = distributed.wrap(model, ranks, torch.device("cpu"))
    return digests


def main(out: Path) -> None:
    ranks = distributed.start()
    record = {"world_size": ranks.world_size, "scenarios": {}}
    for backend in BACKENDS:
        for grow in list_strategies()["grow"]:
            for compress in (False, True):
                name = f"{backend}/{grow}/{'compress' if compress else 'fixed'}"
                record["scenarios"][name] = scenario(backend, grow, compress, ranks)
    model = SparseMLP(SIZES, epsilon=3.0, seed=7)
    if ranks.rank == 1:
        with torch.no_grad():
            model.fc2.connection_values()[0] += 1e-6
    try:
        distributed.check_synchronized(model, None, ranks, "after the perturbation")
    except distributed.SynchronizationError as exc:
        record["perturbed"] = str(exc)
    (out / f"rank-{ranks.rank}.json").write_text(json.dumps(record))
    distributed.stop(ranks)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
