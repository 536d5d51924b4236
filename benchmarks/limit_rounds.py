"""The csr training step against the limit, round by round: how much of the spread between
`synthprune bench` runs is the machine. Each round times 20 dense GEMMs (the limit's rate),
then 20 csr steps and 5 dense steps of the reference MLP (ε = 20, batch 128), one thread, the
thread's CPU time; the ratio of a round uses the GEMM measured just before its steps.

    python benchmarks/limit_rounds.py [ROUNDS]      (default 30; ~3 s a round)

On the shared host of 2026-12-02 the GEMM stayed within ±10% while the csr step moved by 2.5x
between rounds: its random row fetches are what other tenants slow down.
"""

import statistics
import sys
import time

import torch

from synthprune.allocator import reuse_freed_memory
from synthprune.bench import _connections, _gemm, _mlp, _train_step
from synthprune.optim import sgd

SIZES = [784, 1000, 1000, 1000, 10]


def main(rounds: int) -> None:
    reuse_freed_memory()  # as the command line does
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(128, 784, generator=generator), torch.randint(0, 10, (128,), generator=generator)
    models = {backend: _mlp(SIZES, backend, 20.0) for backend in ("csr", "dense")}
    optimizers = {backend: sgd(model.parameters(), lr=0.01, momentum=0.9) for backend, model in models.items()}
    connections = _connections(models["csr"])  # 125,680
    product, work = _gemm(1000, 128)

    def timed(fn, repeat: int) -> float:
        start = time.thread_time()
        for _ in range(repeat):
            fn()
        return (time.thread_time() - start) / repeat

    for _ in range(10):  # warm-up
        product()
        _train_step(models["csr"], optimizers["csr"], x, y)
    ratios = []
    print("round  csr/limit  csr step ms  GEMM ms  dense/csr")
    for r in range(rounds):
        gemm = timed(product, 20)
        csr = timed(lambda: _train_step(models["csr"], optimizers["csr"], x, y), 20)
        dense = timed(lambda: _train_step(models["dense"], optimizers["dense"], x, y), 5)
        limit = 3 * connections * 128 * gemm / work
        ratios.append(csr / limit)
        print(f"{r + 1:5d}  {csr / limit:9.2f}  {1e3 * csr:11.3f}  {1e3 * gemm:7.3f}  {dense / csr:9.2f}")
    ratios.sort()
    print(f"csr / limit over {rounds} rounds: min {ratios[0]:.2f}, median {statistics.median(ratios):.2f}, "
          f"max {ratios[-1]:.2f}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 30)
