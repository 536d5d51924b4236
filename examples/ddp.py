"""Data-parallel training with your own loop: two CPU processes (gloo), DistributedDataParallel,
and compression from the Python API. `synthprune.rewire_ddp` takes the wrapper apart, rewires,
checks that both ranks hold the same wiring, and returns a new wrapper. Under torchrun, call
the body of `worker` with your ranks instead of spawning. python examples/ddp.py"""

import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch.nn.parallel import DistributedDataParallel

import synthprune


def worker(rank: int, world: int, rendezvous: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    digits = load_digits()
    x, y = torch.tensor(digits.data, dtype=torch.float32) / 16, torch.tensor(digits.target)
    model = synthprune.SparseMLP([64, 256, 256, 10], epsilon=5, seed=0)  # the same seed on every rank
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    rewirer = synthprune.Rewirer(ddp, optimizer, grow="synthesis", seed=0, compress_to=0.05, compress_end_step=9,
                                 schedule=synthprune.RewireSchedule(every=25))
    order = torch.Generator().manual_seed(0)
    for step in range(1, 301):
        batch = torch.randint(0, 1500, (64,), generator=order)  # the same global batch on every rank...
        mine = batch[rank::world]  # ...of which each rank trains on its share
        optimizer.zero_grad()
        F.cross_entropy(ddp(x[mine]), y[mine]).backward()
        optimizer.step()
        if rewirer.rewire_schedule.due(step):
            ddp, reports = synthprune.rewire_ddp(ddp, rewirer)  # not rewirer.step(): DDP holds the weights
    if rank == 0:
        accuracy = (model(x[1500:]).argmax(1) == y[1500:]).float().mean().item()
        print(f"{world} processes: held-out accuracy {accuracy:.3f}, connections "
              f"{[r.connections for r in reports]} after {rewirer.step_count} rewiring steps")
    dist.destroy_process_group()


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as folder:
        mp.start_processes(worker, args=(2, os.path.join(folder, "rendezvous")), nprocs=2, start_method="spawn")
