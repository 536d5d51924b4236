"""``synthprune bench``: how fast and how small the backends are, measured honestly.

Every comparison runs its contenders in one process, on the same inputs, alternating them
round by round, and reports medians -- so a noisy, shared machine slows all sides alike and the
*ratios* stay meaningful. With one thread (``--threads 1``) the times are the thread's CPU
time, so time the machine gives to other processes does not count; otherwise wall time. The
limit line's dense GEMM alternates with the training steps it is compared with. Timings use
random inputs of the reference shapes (the values do not change the work), so no dataset is
needed. Peak memory is measured per contender in a fresh process (the operating system's peak
resident size), since allocations are not returned to it.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from synthprune import csr_kernel
from synthprune.models import SparseMLP
from synthprune.optim import sgd
from synthprune.residual import residual_network
from synthprune.rewiring import Rewirer
from synthprune.runs import connections

__all__ = ["BenchSettings", "run_bench"]

TRAIN_EXAMPLES = 60_000  # Fashion-MNIST's training set: what "an epoch" means here


@dataclass
class BenchSettings:
    sizes: tuple[int, ...] = (784, 1000, 1000, 1000, 10)
    batch: int = 128
    timed_batches: int = 20  # per contender per round
    rounds: int = 5
    epsilons: tuple[float, ...] = (20.0, 5.0)
    widths: tuple[int, ...] = (1000, 4000, 16000)
    latency_calls: int = 100
    memory: bool = True

    @classmethod
    def quick(cls) -> BenchSettings:
        return cls(sizes=(784, 128, 128, 10), timed_batches=2, rounds=2, widths=(128, 512), latency_calls=5)

    @property
    def batches_per_epoch(self) -> int:
        return -(-TRAIN_EXAMPLES // self.batch)


def _mlp(sizes, backend: str, epsilon: float | None, seed: int = 0) -> nn.Module:
    if backend == "dense":
        return SparseMLP(sizes, density=1.0, seed=seed)  # every layer an nn.Linear
    return SparseMLP(sizes, epsilon=epsilon, backend=backend, seed=seed)


def _connections(model: nn.Module) -> int:
    return sum(connections(model).values())


def _train_step(model, optimizer, x, y) -> None:
    optimizer.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    optimizer.step()


def _clock() -> Callable[[], float]:
    """CPU seconds of this thread when torch computes on one thread (time the machine gave to
    other processes does not count), else wall seconds (CPU time would add up the threads)."""
    return time.thread_time if torch.get_num_threads() == 1 else time.perf_counter


def _alternate(contenders: dict[str, Callable[[], None]], rounds: int, repeat: int) -> dict[str, float]:
    """Median seconds per call of each contender, the contenders alternating round by round."""
    for fn in contenders.values():  # warm-up: first-call allocations, caches
        fn()
    clock = _clock()
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, fn in contenders.items():
            start = clock()
            for _ in range(repeat):
                fn()
            samples[name].append((clock() - start) / repeat)
    return {name: statistics.median(values) for name, values in samples.items()}


def _gemm(n: int, batch: int) -> tuple[Callable[[], None], int]:
    """(a dense ``[n, n] × [n, batch]`` product, its multiply-adds): the machine's practical
    rate for the layers' arithmetic at this process's thread count."""
    a, b = torch.randn(n, n), torch.randn(n, batch)
    return (lambda: torch.mm(a, b)), n * n * batch


def bench_training(s: BenchSettings, log: Callable[[str], None]) -> dict:
    """Seconds per training epoch (forward, backward, optimizer step) per backend and ε."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(s.batch, s.sizes[0], generator=generator)
    y = torch.randint(0, s.sizes[-1], (s.batch,), generator=generator)
    result = {}
    fast = csr_kernel.ops() is not None
    # The limit's GEMM alternates with the steps, so that both see the same machine: on a shared
    # host the rate drifts by tens of percent between minutes.
    product, work = _gemm(s.sizes[1] if len(s.sizes) > 2 else s.sizes[0], s.batch)
    for epsilon in s.epsilons:
        log(f"training step, ε = {epsilon:g}: dense vs masked vs csr")
        contenders, sizes = {"gemm": product}, {}
        for backend in ("dense", "masked", "csr"):
            model = _mlp(s.sizes, backend, epsilon)
            optimizer = sgd(model.parameters(), lr=0.01, momentum=0.9)
            contenders[backend] = lambda m=model, o=optimizer: _train_step(m, o, x, y)
            sizes[backend] = _connections(model)
        if fast:  # the same csr model on the torch.sparse path, to show what the kernel gains
            contenders["csr_torch_sparse"] = lambda step=contenders["csr"]: _on_torch_sparse(step)
        seconds = _alternate(contenders, s.rounds, s.timed_batches)
        rate = work / seconds.pop("gemm")
        limit = 3 * sizes["csr"] * s.batch / rate
        result[f"eps{epsilon:g}"] = {
            "epsilon": epsilon, "connections": sizes,
            "gemm_multiply_adds_per_second": rate, "step_limit_seconds": limit,
            "step_seconds": seconds, "csr_over_limit": seconds["csr"] / limit,
            "epoch_seconds": {b: t * s.batches_per_epoch for b, t in seconds.items()},
            "dense_over_csr": seconds["dense"] / seconds["csr"], "masked_over_csr": seconds["masked"] / seconds["csr"],
        }
        if fast:
            result[f"eps{epsilon:g}"]["torch_sparse_over_fast"] = seconds["csr_torch_sparse"] / seconds["csr"]
    return result


def _on_torch_sparse(step: Callable[[], None]) -> None:
    with csr_kernel.forced("torch"):
        step()


def bench_rewiring(s: BenchSettings, epoch_seconds: float, log: Callable[[str], None]) -> dict:
    """One rewiring step per strategy on the csr MLP at ε = 20, as a share of a csr epoch."""
    log("rewiring step per strategy (csr, ε = 20)")
    generator = torch.Generator().manual_seed(1)
    batch = (torch.randn(s.batch, s.sizes[0], generator=generator), torch.randint(0, s.sizes[-1], (s.batch,)))
    result = {}
    for grow in ("random", "synthesis", "gradient"):
        model = _mlp(s.sizes, "csr", 20.0)
        optimizer = sgd(model.parameters(), lr=0.01, momentum=0.9)
        _train_step(model, optimizer, *batch)
        rewirer = Rewirer(model, optimizer, grow=grow, seed=0)
        seconds = _alternate({grow: lambda r=rewirer: r.step(batch=batch)}, s.rounds, 1)[grow]
        result[grow] = {"seconds": seconds, "share_of_epoch": seconds / epoch_seconds}
    return result


def bench_scaling(s: BenchSettings, log: Callable[[str], None]) -> dict:
    """csr training and rewiring steps as the hidden width grows at ε = 20."""
    result = {}
    x = torch.randn(s.batch, s.sizes[0])
    y = torch.randint(0, s.sizes[-1], (s.batch,))
    for width in s.widths:
        log(f"scaling: csr, 3 hidden layers of {width:,}")
        model = _mlp((s.sizes[0], width, width, width, s.sizes[-1]), "csr", 20.0)
        optimizer = sgd(model.parameters(), lr=0.01, momentum=0.9)
        rewirer = Rewirer(model, optimizer, grow="synthesis", seed=0)
        train = lambda m=model, o=optimizer: _train_step(m, o, x, y)
        times = _alternate({"train": train, "rewire": rewirer.step},
                           max(2, s.rounds // 2), 1)
        result[str(width)] = {"connections": _connections(model), "train_step_seconds": times["train"],
                              "rewire_step_seconds": times["rewire"]}
    return result


@torch.no_grad()
def bench_inference(s: BenchSettings, log: Callable[[str], None]) -> dict:
    """Latency at batch 1 and 256: dense, csr (ε = 20) and the residual network of a csr MLP
    compressed to 1%."""
    log("inference latency: dense vs csr vs residual network")
    dense, sparse = _mlp(s.sizes, "dense", None).eval(), _mlp(s.sizes, "csr", 20.0).eval()
    compressed = _mlp(s.sizes, "csr", 20.0)
    optimizer = torch.optim.SGD(compressed.parameters(), lr=0.0)  # stateless: the compression step only
    Rewirer(compressed, optimizer, grow="none", prune="magnitude", compress_to=0.01, compress_end_step=0).step()
    residual, summary = residual_network(compressed.eval())
    models = {"dense": dense, "csr": sparse, "residual": residual}
    result = {"connections": {"dense": _connections(dense), "csr": _connections(sparse),
                              "residual": sum(summary.connections_after)}}
    for batch in (1, 256):
        x = torch.randn(batch, s.sizes[0])
        calls = s.latency_calls if batch == 1 else max(3, s.latency_calls // 10)
        contenders = {name: lambda m=m, x=x: m(x) for name, m in models.items()}
        if csr_kernel.ops() is not None:  # the csr models again on the torch.sparse path
            for name in ("csr", "residual"):
                contenders[f"{name}_torch_sparse"] = lambda call=contenders[name]: _on_torch_sparse(call)
        seconds = _alternate(contenders, s.rounds, calls)
        result[f"batch{batch}_ms"] = {name: 1000 * t for name, t in seconds.items()}
    return result


_MEMORY_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    from synthprune.bench import _mlp, _train_step
    from synthprune.optim import sgd

    def status(field):  # kB figures of /proc/self/status (Linux)
        with open("/proc/self/status") as handle:
            return next(int(line.split()[1]) for line in handle if line.startswith(field + ":"))

    sizes, backend, epsilon, batch = json.loads(sys.argv[1])
    # Warm up on a tiny model of the same kind: kernels, thread pools and allocator arenas are a
    # fixed cost of the process, not memory the network needs.
    tiny = _mlp([sizes[0], 16, sizes[-1]], backend, 2.0)
    _train_step(tiny, sgd(tiny.parameters(), lr=0.01, momentum=0.9),
                torch.randn(batch, sizes[0]), torch.randint(0, sizes[-1], (batch,)))
    del tiny
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # reset the peak (VmHWM) to the current size, after the imports
    base = status("VmRSS")
    model = _mlp(sizes, backend, epsilon)
    optimizer = sgd(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(batch, sizes[0]), torch.randint(0, sizes[-1], (batch,))
    for _ in range(3):
        _train_step(model, optimizer, x, y)
    print(json.dumps((status("VmHWM") - base) * 1024))
""")


def bench_memory(s: BenchSettings, log: Callable[[str], None]) -> dict:
    """Peak resident memory of training (model, gradients, momentum, activations) per backend
    at ε = 20, each in a fresh process, above its footprint after a warm-up step on a tiny
    model of the same kind (Linux: the peak is reset through ``/proc/self/clear_refs``;
    elsewhere this part is skipped)."""
    if not Path("/proc/self/clear_refs").exists():
        log("peak memory: skipped (needs Linux /proc)")
        return {}
    log("peak training memory (fresh process per backend)")
    result = {}
    for backend in ("dense", "masked", "csr"):
        args = json.dumps([list(s.sizes), backend, 20.0, s.batch])
        process = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, args], capture_output=True, text=True)
        if process.returncode != 0:
            raise RuntimeError(f"memory measurement of {backend} failed: {process.stderr.strip()[-300:]}")
        result[backend] = int(process.stdout.strip().splitlines()[-1])
    result["csr_over_dense"] = result["csr"] / max(1, result["dense"])
    return result


_STEP_SCRIPT = textwrap.dedent("""
    import json, sys, time
    import torch
    from synthprune.bench import _mlp, _train_step
    from synthprune.optim import sgd

    sizes, backend, epsilon, batch, threads, steps = json.loads(sys.argv[1])
    if threads:
        torch.set_num_threads(threads)
    model = _mlp(sizes, backend, epsilon)
    optimizer = sgd(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(batch, sizes[0]), torch.randint(0, sizes[-1], (batch,))
    for _ in range(3):
        _train_step(model, optimizer, x, y)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        _train_step(model, optimizer, x, y)
        times.append(time.perf_counter() - start)
    print(json.dumps([torch.get_num_threads(), sorted(times)[len(times) // 2]]))
""")


def bench_under_load(s: BenchSettings, log: Callable[[str], None]) -> dict:
    """A training step per backend at ε = 20, wall time, at 1 thread, at every core (torch's
    own default) and at the count ``synthprune train`` picks from the model's work
    (:mod:`synthprune.threads`; ``default``, usually one of the other two), while one busy
    process per core keeps the machine loaded.

    Each measurement is the median step of a fresh process that inherits this one's environment
    (the command line's passive OpenMP wait policy included). Time-sharing the cores with the
    busy processes moves one such median by up to 1.7x between two processes of the same
    setting, so the counts take turns for ``s.rounds`` rounds (at most 3) and the figure is the
    median over rounds; a count is measured once per round, also where the default equals it.
    ``default_over_best``: the default against the best count measured. The busy processes are
    stopped however this ends."""
    from synthprune.threads import suggested_threads

    cores = os.cpu_count() or 1
    rounds = max(1, min(s.rounds, 3))
    log(f"under load: {cores} busy process(es), one per core; {rounds} rounds")
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(cores)]
    result = {"busy_processes": cores, "wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset"), "rounds": rounds}
    try:
        for backend in ("dense", "masked", "csr"):
            default = suggested_threads(_mlp(s.sizes, backend, 20.0), s.batch, cores)
            counts = sorted({1, cores, default})
            samples: dict[int, list[float]] = {n: [] for n in counts}
            for _ in range(rounds):
                for n in counts:
                    args = json.dumps([list(s.sizes), backend, 20.0, s.batch, n, max(5, 4 * s.timed_batches)])
                    process = subprocess.run([sys.executable, "-c", _STEP_SCRIPT, args], capture_output=True,
                                             text=True)
                    if process.returncode != 0:
                        raise RuntimeError(f"step under load ({backend}) failed: {process.stderr.strip()[-300:]}")
                    samples[n].append(json.loads(process.stdout.strip().splitlines()[-1])[1])
            measured = {n: {"threads": n, "step_seconds": statistics.median(samples[n]), "rounds_seconds": samples[n]}
                        for n in counts}
            row = {"one_thread": measured[1], "all_cores": measured[cores], "default": measured[default]}
            best = min(m["step_seconds"] for m in measured.values())
            row["default_over_best"] = row["default"]["step_seconds"] / best
            result[backend] = row
            log(f"  {backend}: 1 thread {1e3 * row['one_thread']['step_seconds']:.1f} ms, {cores} threads "
                f"{1e3 * row['all_cores']['step_seconds']:.1f} ms; default: {default} thread(s)")
    finally:
        for process in busy:
            process.kill()
            process.wait()
    return result


def run_bench(settings: BenchSettings, log: Callable[[str], None] = print) -> dict:
    """Every measurement; a JSON-ready dict."""
    result = {"machine": {"threads": torch.get_num_threads(), "torch": torch.__version__,
                          "python": sys.version.split()[0], "csr_path": csr_kernel.describe()},
              "settings": {"sizes": list(settings.sizes), "batch": settings.batch,
                           "batches_per_epoch": settings.batches_per_epoch, "rounds": settings.rounds,
                           "timed_batches": settings.timed_batches}}
    result["training"] = bench_training(settings, log)
    first = result["training"][f"eps{settings.epsilons[0]:g}"]["epoch_seconds"]["csr"]
    result["rewiring"] = bench_rewiring(settings, first, log)
    result["scaling"] = bench_scaling(settings, log)
    result["inference"] = bench_inference(settings, log)
    if settings.memory:
        result["memory_bytes"] = bench_memory(settings, log)
    return result
