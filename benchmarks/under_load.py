"""One csr training step of the reference MLP (epsilon = 20, batch 128), wall time, median of 40
steps. Run it while other processes keep the cores busy, with and without a passive OpenMP wait
policy, e.g.

    python -c "while True: pass" &   # one busy process per core not otherwise used
    env -u OMP_WAIT_POLICY python benchmarks/under_load.py 2
    OMP_WAIT_POLICY=PASSIVE python benchmarks/under_load.py 2
    OMP_WAIT_POLICY=PASSIVE python benchmarks/under_load.py 1
"""

import os
import sys
import time

import torch
import torch.nn.functional as F

import synthprune


def main(threads: int) -> None:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = synthprune.SparseMLP([784, 1000, 1000, 1000, 10], epsilon=20, seed=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(128, 784), torch.randint(0, 10, (128,))

    def step() -> None:
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()

    for _ in range(5):
        step()
    times = []
    for _ in range(40):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    policy = os.environ.get("OMP_WAIT_POLICY", "unset")
    print(f"wait policy {policy}, {threads} thread(s): {1e3 * sorted(times)[20]:.1f} ms wall per step")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else torch.get_num_threads())
