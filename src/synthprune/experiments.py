"""Sweeps: many training runs (configurations × seeds) as separate worker processes.

A sweep is a list of named configurations, each run for every seed into
``OUT/<name>-s<seed>/``. Each run is ``synthprune train`` in its own process, so a crash, a
NaN or a kill hurts that run only. Re-running the same sweep skips finished runs and resumes
interrupted ones from their checkpoints. The results go to ``OUT/sweep.csv`` (one row per run)
and ``OUT/summary.md`` (mean ± std over seeds per configuration).
"""

from __future__ import annotations

import contextlib
import csv
import io
import itertools
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from synthprune.config import TrainConfig, config_from_file, load_config
from synthprune.files import FolderLock, atomic_write, clean_temporaries, read_json, read_yaml
from synthprune.rundir import RunDir
from synthprune.runs import run_name

__all__ = [
    "RunResult", "SweepRun", "grid", "load_spec", "mean_std", "parse_list", "parse_seeds", "plan", "run_sweep",
    "summarize_sweep",
]

PARENT_ENV = "SYNTHPRUNE_SWEEP_PID"  # a worker stops when the process with this pid is no longer its parent
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._,=+-]{0,99}$")  # a run name is one plain path component
SPEC_KEYS = ("preset", "seeds", "common", "runs")


@dataclass
class SweepRun:
    name: str  # the configuration's name, shared by its seeds
    seed: int
    config: TrainConfig
    out: Path

    @property
    def label(self) -> str:
        return run_name(self.name, self.seed)


@dataclass
class RunResult:
    run: SweepRun
    status: str  # finished | skipped (finished before) | failed
    error: str = ""
    summary: dict = field(default_factory=dict)


def parse_list(text: str | None) -> list[str]:
    """``"a, b,,c"`` -> ``["a", "b", "c"]`` (``None`` -> ``[]``)."""
    text = text or ""
    return [item.strip() for item in text.split(",") if item.strip()]


def parse_seeds(text: str) -> list[int]:
    """``"0-4"`` -> [0, 1, 2, 3, 4]; ``"0,2,7"`` -> [0, 2, 7]."""
    seeds: list[int] = []
    try:
        for part in parse_list(text):
            low, _, high = part.partition("-")
            seeds += list(range(int(low), int(high) + 1)) if high else [int(low)]
    except ValueError:
        raise ValueError(f"seeds must look like 0-4 or 0,1,2, got {text!r}") from None
    if not seeds:
        raise ValueError("no seeds given")
    return sorted(set(seeds))


def grid(grow: list[str], compress_to: list[str], settings: list[str]) -> dict[str, dict]:
    """Named configurations for the product of grow strategies, compression targets (``full``
    = none) and ``KEY=V1,V2`` settings. ``grow`` may hold ``dense`` (the dense baseline)."""
    axes: list[list[tuple[str, str]]] = [[("grow", g) for g in grow] or [("grow", "synthesis")],
                                         [("compress_to", c) for c in compress_to] or [("compress_to", "full")]]
    for setting in settings:
        key, sep, values = setting.partition("=")
        if not sep or not key.strip() or not parse_list(values):
            raise ValueError(f"--set takes KEY=V1,V2,..., got {setting!r}")
        axes.append([(key.strip().replace("-", "_"), v) for v in parse_list(values)])
    configs: dict[str, dict] = {}
    for combination in itertools.product(*axes):
        overrides: dict = {}
        parts = []
        for key, value in combination:
            if key == "grow" and value == "dense":
                overrides["backend"] = "dense"
                parts.append("dense")
            elif key == "grow":
                overrides["grow"] = value
                parts.append(value)
            elif key == "compress_to":
                if value != "full":
                    overrides["compress_to"] = value
                    parts.append(f"c{value}")
            else:
                overrides[key] = yaml.safe_load(value)
                parts.append(f"{key}={value}")
        if overrides.get("backend") == "dense" and "compress_to" in overrides:
            continue  # the dense baseline is not compressed
        name = safe_name("-".join(parts))
        if name in configs:
            raise ValueError(f"two grid configurations would share the run name {name!r}; "
                             "run them as named configurations in a --spec file")
        configs[name] = overrides
    return configs


def safe_name(text: str) -> str:
    """A grid configuration's name as one plain path component: characters that could leave
    the sweep folder or confuse a shell (``/``, ``..``, spaces, ...) become ``_``."""
    name = re.sub(r"[^A-Za-z0-9._,=+-]", "_", text).lstrip(".-_,=+") or "run"
    return name[:100]


def check_name(name: str, where: str) -> str:
    """A named configuration must be a plain path component: no ``/``, no ``..``, no leading dot."""
    if not SAFE_NAME.match(name):
        raise ValueError(f"{where}: run name {name!r} must be a plain folder name (letters, digits and . _ , = + -, "
                         "not starting with a dot or dash, at most 100 characters); rename it")
    return name


def load_spec(path: str | Path) -> tuple[dict, dict[str, dict], list[int] | None]:
    """A sweep file: ``preset``, ``seeds``, common settings under ``common`` and named
    configurations under ``runs`` (each a mapping of settings). Every part is checked, and an
    error names the file and the part."""
    todo = "fix the sweep file (keys: preset, seeds, common, runs)"
    spec = read_yaml(path, todo)
    unknown = [str(k) for k in spec if k not in SPEC_KEYS]
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {', '.join(unknown)}; valid: {', '.join(SPEC_KEYS)}")
    runs, common = spec.get("runs"), spec.get("common") or {}
    if not isinstance(runs, dict) or not runs:
        raise ValueError(f"{path}: `runs:` must be a non-empty mapping of named configurations")
    if not isinstance(common, dict):
        raise ValueError(f"{path}: `common:` must be a mapping of settings, not {type(common).__name__}")
    for name, settings in runs.items():
        check_name(str(name), str(path))
        if settings is not None and not isinstance(settings, dict):
            raise ValueError(f"{path}: run {name!r} must be a mapping of settings, not {type(settings).__name__}")
    if spec.get("preset") is not None and not isinstance(spec["preset"], str):
        raise ValueError(f"{path}: `preset:` must be a preset's name")
    seeds = spec.get("seeds")
    if seeds is not None:
        try:
            seeds = parse_seeds(",".join(map(str, seeds)) if isinstance(seeds, list) else str(seeds))
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None
    return {"preset": spec.get("preset"), **common}, {str(k): dict(v or {}) for k, v in runs.items()}, seeds


def plan(configs: dict[str, dict], seeds: list[int], out: str | Path, preset: str | None = None,
         common: dict | None = None) -> list[SweepRun]:
    """One :class:`SweepRun` per configuration and seed; every config is validated first, so a
    typo fails the sweep before anything runs."""
    runs = []
    root = Path(out).resolve()
    for name, overrides in configs.items():
        check_name(name, "sweep")
        for seed in seeds:
            values = {**(common or {}), **overrides, "seed": seed}
            try:
                config = load_config(preset, None, **values)
            except ValueError as exc:
                raise ValueError(f"configuration {name!r}: {exc}") from None
            target = Path(out) / run_name(name, seed)
            if target.resolve().parent != root:  # e.g. through a symbolic link: never write outside --out
                raise ValueError(f"configuration {name!r}: its run folder {target} resolves outside --out {out}")
            runs.append(SweepRun(name, seed, config, target))
    return runs


def _prepare(run: SweepRun, specs: Path) -> tuple[list[str] | None, str]:
    """The ``synthprune train`` arguments for a run (``None``: already finished) and what
    happens to it (start, resume, skip)."""
    run_dir = RunDir(run.out)
    wanted = run.config.to_dict()
    if run_dir.lock.is_held_elsewhere(patience=3.0):  # e.g. a worker of an earlier sweep still training
        raise ValueError(f"{run.out} is being trained by another process (pid {run_dir.lock.holder()}); "
                         "wait for it to end or stop it, then run the sweep again")
    if run_dir.config.exists():
        saved = run_dir.read_config()
        # A run written before a setting existed ran with its default; one holding a setting this
        # version does not know (TypeError) simply differs.
        with contextlib.suppress(TypeError):
            saved = TrainConfig(**saved).to_dict()
        if saved != wanted:
            differ = sorted(k for k in wanted if saved.get(k) != wanted[k])
            raise ValueError(f"{run.out} holds a run with other settings ({', '.join(differ)}); "
                             "move it away or choose another --out")
        if run_dir.is_finished():
            return None, "skip"
        if run_dir.checkpoint.exists():
            return ["--resume", "--out", str(run.out)], "resume"
        # Killed before its first epoch ended: train starts it again in the same folder.
    spec = specs / f"{run.label}.yaml"
    atomic_write(spec, yaml.safe_dump(wanted, sort_keys=False))
    return ["--config", str(spec), "--out", str(run.out)], "start"


class _Workers:
    """The sweep's ``synthprune train`` processes. They stay in the sweep's process group (a
    Ctrl-C reaches them all), stop themselves when the sweep dies (``PARENT_ENV``), and are
    stopped when the sweep is interrupted or terminated."""

    def __init__(self, strategies: list[str] | None = None) -> None:
        self.live: set[subprocess.Popen] = set()
        self.lock = threading.Lock()
        self.stopping = False
        self.strategies = [arg for source in strategies or [] for arg in ("--strategies", source)]

    def train(self, args: list[str], threads: int) -> tuple[int, str]:
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
               PARENT_ENV: str(os.getpid())}
        with self.lock:
            if self.stopping:
                return 130, "interrupted"
            process = subprocess.Popen([sys.executable, "-m", "synthprune", "train", *args, *self.strategies,
                                        "--quiet", "--no-plots"],
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
            self.live.add(process)
        try:
            stdout, stderr = process.communicate()
        finally:
            with self.lock:
                self.live.discard(process)
        lines = (stderr or stdout).strip().splitlines()
        return process.returncode, lines[-1] if lines else f"exit {process.returncode}"

    def stop(self) -> None:
        """Interrupt every running worker (each checkpoints and exits) and wait for them."""
        with self.lock:
            self.stopping = True
            live = list(self.live)
        for process in live:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGINT)
        for process in live:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()


def _terminate_as_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def run_sweep(runs: list[SweepRun], out: str | Path, jobs: int | None = None,
              on_done: Callable[[RunResult, str], None] | None = None,
              strategies: list[str] | None = None, threads: int | None = None) -> list[RunResult]:
    """Run every run (``jobs`` at a time, default: the CPU count; each worker with ``threads``
    threads, default: the cores shared between the jobs), then write ``sweep.csv``
    and ``summary.md`` into ``out``. A failed run is reported in its result, never raised.
    One sweep writes ``out`` at a time (its ``.lock``). ``strategies``: modules every worker
    imports first (``train --strategies``)."""
    out = Path(out)
    jobs = max(1, jobs or os.cpu_count() or 1)
    threads = threads or max(1, (os.cpu_count() or 1) // jobs)  # workers share the cores, not oversubscribe
    with FolderLock(out, "sweep folder"), _signals_as_interrupt():
        clean_sweep_temporaries(out)
        specs = out / ".sweep"
        prepared = [(run, *_prepare(run, specs)) for run in runs]  # all checks before any work
        results: list[RunResult] = []
        workers = _Workers(strategies)

        def execute(run: SweepRun, args: list[str] | None, action: str) -> tuple[RunResult, str]:
            if args is not None:
                code, last_line = workers.train(args, threads)
                if code != 0:
                    return RunResult(run, "failed", error=last_line), action
            try:
                summary = _summary(run)
            except (ValueError, KeyError, TypeError, RuntimeError) as exc:  # its records: reported, never fatal
                return RunResult(run, "failed", error=f"trained, but its summary failed: {exc}"[:300]), action
            return RunResult(run, "skipped" if args is None else "finished", summary=summary), action

        pool = ThreadPoolExecutor(max_workers=jobs)
        try:
            futures = [pool.submit(execute, *item) for item in prepared]
            for future in as_completed(futures):
                result, action = future.result()
                results.append(result)
                if on_done:
                    on_done(result, action)
        except BaseException:
            workers.stop()
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        order = {run.label: i for i, run in enumerate(runs)}
        results.sort(key=lambda r: order[r.run.label])
        # sweep.csv and summary.md accumulate: finished runs of earlier invocations (other seeds
        # or configurations in the same folder) are listed too, after this one's.
        earlier = _earlier_runs(out, {run.out.resolve() for run in runs})
        write_results(results + earlier, out)
    return results


def _earlier_runs(out: Path, planned: set[Path]) -> list[RunResult]:
    """Finished runs in ``out`` that this invocation did not plan (``<configuration>-s<seed>``),
    as results of status ``skipped``, ordered by configuration and seed."""
    found = []
    for info in sorted(out.glob("*-s*/final/config.json")):
        folder = info.parent.parent
        name, _, seed = folder.name.rpartition("-s")
        if folder.resolve() in planned or not seed.isdigit() or not RunDir(folder).is_finished():
            continue
        try:
            config = config_from_file(read_json(info, "train the run again")["config"], info)
            run = SweepRun(name, int(seed), config, folder)
            found.append(RunResult(run, "skipped", summary=_summary(run)))
        except (ValueError, KeyError, TypeError) as exc:  # a damaged earlier run: listed, never fatal here
            run = SweepRun(name, int(seed), TrainConfig(), folder)
            found.append(RunResult(run, "failed", error=str(exc).splitlines()[0][:200]))
    return sorted(found, key=lambda r: (r.run.name, r.run.seed))


def clean_sweep_temporaries(out: Path) -> None:
    """What killed writes of the sweep itself left (its runs clean their own folders)."""
    for folder in (out, out / ".sweep"):
        if folder.is_dir():
            clean_temporaries(folder, recursive=False)


@contextlib.contextmanager
def _signals_as_interrupt():
    """SIGTERM (e.g. ``kill``) stops the sweep as Ctrl-C does: workers are interrupted first."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _terminate_as_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _summary(run: SweepRun) -> dict:
    """What the sweep tables need from a finished run, residual network included."""

    from synthprune.residual import residual_network
    from synthprune.runs import load_run_model

    info = json.loads((RunDir(run.out).final / "config.json").read_text())
    model, _ = load_run_model(run.out)
    _, residual = residual_network(model.eval())
    summary = info["summary"]
    return {
        "final_test_accuracy": summary["final_test_accuracy"], "best_test_accuracy": summary["best_test_accuracy"],
        "connections": summary["connections"], "compression": summary["dense_weights"] / summary["connections"],
        "residual_connections": sum(residual.connections_after),
        "live_neurons": residual.neurons_after[1:-1], "seconds_per_epoch": summary["seconds_per_epoch"],
    }


def write_results(results: list[RunResult], out: Path) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["config", "seed", "status", "final_test_accuracy", "best_test_accuracy", "connections",
                     "compression", "residual_connections", "live_neurons", "seconds_per_epoch", "run", "error"])
    for r in results:
        s = r.summary
        writer.writerow([r.run.name, r.run.seed, r.status, s.get("final_test_accuracy", ""),
                         s.get("best_test_accuracy", ""), s.get("connections", ""), s.get("compression", ""),
                         s.get("residual_connections", ""), "/".join(map(str, s.get("live_neurons", []))),
                         s.get("seconds_per_epoch", ""), str(r.run.out), r.error])
    atomic_write(out / "sweep.csv", buffer.getvalue())
    atomic_write(out / "summary.md", summarize_sweep(results))


def mean_std(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{scale * values[0]:.{digits}f}"
    return f"{scale * statistics.mean(values):.{digits}f} ± {scale * statistics.stdev(values):.{digits}f}"


def mean_ci(values: list[float], scale: float = 100.0, digits: int = 2) -> str:
    """``mean ± half-width`` of the 95% Student-t interval of ``values`` (a paired difference
    by seed, or one configuration's scores), times ``scale`` (points from fractions); one value
    has no interval and says so."""
    mean = scale * statistics.fmean(values)
    if len(values) < 2:
        return f"{mean:.{digits}f} (1 seed, no CI)"
    from scipy import stats  # on first use: scipy is slow to import

    half = scale * stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / len(values) ** 0.5
    return f"{mean:.{digits}f} ± {half:.{digits}f}"


def summarize_sweep(results: list[RunResult]) -> str:
    """A Markdown table: per configuration, mean ± std over its finished seeds."""
    lines = ["| configuration | seeds | final test acc % | best test acc % | connections | compression "
             "| residual connections | live neurons per hidden layer | s / epoch |",
             "|---|---|---|---|---|---|---|---|---|"]
    names = list(dict.fromkeys(r.run.name for r in results))
    failed = [r for r in results if r.status == "failed"]
    for name in names:
        done = [r.summary for r in results if r.run.name == name and r.summary]
        if not done:
            lines.append(f"| {name} | 0 | – | – | – | – | – | – | – |")
            continue
        column = {key: [s[key] for s in done] for key in done[0]}
        live = " / ".join(f"{statistics.mean(level):,.0f}" for level in zip(*column["live_neurons"], strict=True))
        lines.append(
            f"| {name} | {len(done)} | {mean_std(column['final_test_accuracy'], 100)} "
            f"| {mean_std(column['best_test_accuracy'], 100)} "
            f"| {statistics.mean(column['connections']):,.0f} | {statistics.mean(column['compression']):.1f}× "
            f"| {statistics.mean(column['residual_connections']):,.0f} | {live} "
            f"| {mean_std(column['seconds_per_epoch'], 1, 1)} |")
    if failed:
        lines += ["", "Failed runs:", ""] + [f"- `{r.run.out}`: {r.error}" for r in failed]
    return "\n".join(lines) + "\n"
