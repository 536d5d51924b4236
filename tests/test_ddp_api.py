"""DDP from the Python API: two real gloo processes compress a model with rewire_ddp and end
with the same wiring, values and optimizer state; a bare rewirer.step() under DDP says what to
do instead of failing inside autograd."""

import json

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import synthprune
from synthprune.distributed import synchronized_digests

pytestmark = pytest.mark.slow


def _worker(rank: int, world: int, folder: str, bare: bool) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = synthprune.SparseMLP([20, 32, 32, 4], epsilon=4, seed=0)
        ddp = DistributedDataParallel(model)
        optimizer = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
        rewirer = synthprune.Rewirer(ddp, optimizer, grow="synthesis", compress_to=0.2, compress_end_step=2,
                                     seed=0, schedule=synthprune.RewireSchedule(every=3))
        data = torch.Generator().manual_seed(1)
        x, y = torch.randn(64, 20, generator=data), torch.randint(0, 4, (64,), generator=data)
        counts, error = [], None
        for step in range(1, 13):
            index = torch.arange(rank * 4 + (step % 8) * 8, rank * 4 + (step % 8) * 8 + 4)
            optimizer.zero_grad()
            F.cross_entropy(ddp(x[index]), y[index]).backward()
            optimizer.step()
            if rewirer.rewire_schedule.due(step):
                if bare:
                    try:
                        rewirer.step()
                    except RuntimeError as exc:
                        error = str(exc)
                        break
                else:
                    ddp, reports = synthprune.rewire_ddp(ddp, rewirer)
                    counts.append([r.connections for r in reports])
        result = {"counts": counts, "digests": synchronized_digests(model, optimizer), "error": error}
        with open(f"{folder}/rank{rank}.json", "w") as f:
            json.dump(result, f)
        dist.barrier()  # neither rank tears gloo down while the other still uses it (an abort, seen once)
    finally:
        dist.destroy_process_group()


def _run(tmp_path, bare: bool) -> list[dict]:
    mp.start_processes(_worker, args=(2, str(tmp_path), bare), nprocs=2, join=True, start_method="spawn")
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]


def test_two_processes_compress_alike_with_rewire_ddp(tmp_path):
    first, second = _run(tmp_path, bare=False)
    assert first["counts"] == second["counts"] and len(first["counts"]) == 4
    initial = synthprune.SparseMLP([20, 32, 32, 4], epsilon=4, seed=0)
    before = [layer.nnz for _, layer in synthprune.sparse_layers(initial)]
    assert all(now < then for now, then in zip(first["counts"][-1], before, strict=True))  # it shrank
    assert first["digests"] == second["digests"]  # same wiring, values and momentum on both ranks


def test_a_bare_step_under_ddp_names_the_helper(tmp_path):
    first, _ = _run(tmp_path, bare=True)
    assert first["error"] and "synthprune.rewire_ddp" in first["error"]
