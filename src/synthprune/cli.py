"""The ``synthprune`` command line (typer): train, sweep, plot, residual, export, similarity, list.

Bad input (unknown preset, bad values, unwritable --out, missing data) exits with code 2 and
one line on stderr, never a traceback. An interrupted run exits 130 and resumes with --resume.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from synthprune.config import PRESETS, TRAIN_BACKENDS, ConfigError, load_config, parse_assignments
from synthprune.data import DATASETS
from synthprune.strategies import grow_options, import_strategies, list_strategies

# Typer >= 0.2x raises its own (vendored click) exceptions; older ones raise click's.
CLI_ERRORS: tuple[type[Exception], ...] = (typer.TyperException,)
try:
    import click

    CLI_ERRORS += (click.ClickException,)
except ImportError:  # pragma: no cover - depends on the typer version
    pass

app = typer.Typer(
    add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
    help="Train sparse MLPs whose wiring evolves (strategic synthesis, SET, RigL) and inspect the runs.",
)
# soft wrap: a long path is never broken across lines; no markup: a "[x]" in a path or message is text.
console = Console(stderr=False, soft_wrap=True, markup=False)
# Off a terminal (a log, a pipe, CI) tables are laid out at their natural width, never cut to 80.
UNBOUNDED = 10_000


def show(renderable) -> None:
    """Print a table (or text): fitted to the terminal on one, whole everywhere else (a console's
    width caps every print, so off a terminal an unbounded one does the printing). A table's
    title goes on a line of its own first: rich wraps a title (often a path) to the table's width."""
    if isinstance(renderable, Table) and isinstance(renderable.title, str):
        console.print(renderable.title, highlight=False, style="bold")
        renderable.title = None
    if console.is_terminal:
        console.print(renderable, highlight=False)
    else:
        Console(file=console.file, width=UNBOUNDED, markup=False, highlight=False, color_system=None).print(renderable)


class EpochBar:
    """A rich progress bar for one epoch: loss and accuracy so far."""

    def __init__(self, total: int, epoch: int, epochs: int) -> None:
        self.progress = Progress(
            TextColumn(f"epoch {epoch + 1}/{epochs}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}  acc {task.fields[acc]:.1%}"), TimeElapsedColumn(),
            transient=True, console=console,
        )
        self.task = self.progress.add_task("train", total=total, loss=float("nan"), acc=0.0)

    def __enter__(self) -> EpochBar:
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def advance(self, loss: float, accuracy: float) -> None:
        self.progress.update(self.task, advance=1, loss=loss, acc=accuracy)


def summary_table(title: str, summary: dict) -> Table:
    dense = summary["dense_weights"]
    table = Table(title=title, caption=f"compression vs the dense network's {dense:,} weights")
    # With a validation split the model is chosen on validation (never on test): its test accuracy.
    chosen = "test_accuracy_at_best_validation" in summary
    second = ("test at best val", summary["test_accuracy_at_best_validation"]) if chosen else \
        ("best acc", summary["best_test_accuracy"])
    for column in ("test acc", second[0], "connections", "density", "compression", "s/epoch"):
        table.add_column(column, justify="right")
    table.add_row(
        f"{100 * summary['final_test_accuracy']:.2f}%", f"{100 * second[1]:.2f}%",
        f"{summary['connections']:,}", f"{100 * summary['density']:.2f}%",
        f"{dense / summary['connections']:.1f}x", f"{summary['seconds_per_epoch']:.2f}",
    )
    return table


@app.command()
def train(
    preset: Annotated[str, typer.Option(help=f"Starting configuration: {', '.join(PRESETS)}.")] = "fmnist-mlp",
    config: Annotated[Path | None, typer.Option(help="YAML file of settings on top of the preset.")] = None,
    grow: Annotated[str | None, typer.Option(help="Grow strategy: " + ", ".join(list_strategies()["grow"])
                                             + " (none = static sparse).")] = None,
    prune: Annotated[str | None, typer.Option(help="Prune criterion: " + ", ".join(list_strategies()["prune"])
                                              + ".")] = None,
    epsilon: Annotated[float | None, typer.Option(help="Erdős–Rényi ε: ε·(n_in+n_out) connections per layer.")] = None,
    zeta: Annotated[float | None, typer.Option(help="Fraction rewired at each rewiring step, in (0, 1).")] = None,
    zeta_schedule: Annotated[str | None, typer.Option(help="constant or cosine.")] = None,
    rewire_every: Annotated[int | None, typer.Option(
        min=1, help="Rewire after every N optimizer steps (default: after each epoch).")] = None,
    rewire_until: Annotated[int | None, typer.Option(
        min=1, help="No rewiring at or after this optimizer step (RigL's T_end; default: the end).")] = None,
    endpoint: Annotated[str | None, typer.Option(help="Synthesis endpoint rule: cdf or tail.")] = None,
    compress_to: Annotated[str | None, typer.Option(
        help="Shrink the sparse layers during training to this density (below 1, e.g. 0.01) or connection "
             "count (1 or more), on a cubic schedule.", rich_help_panel="Compression")] = None,
    compress_scope: Annotated[str | None, typer.Option(
        help="global: one total for all sparse layers, shared in proportion to their counts; layer: each "
             "layer on its own.", rich_help_panel="Compression")] = None,
    compress_start: Annotated[int | None, typer.Option(
        help="The budget first shrinks after this epoch (default 1).", rich_help_panel="Compression")] = None,
    compress_end: Annotated[int | None, typer.Option(
        help="The target is reached after this epoch (default: 3/4 of the way through the run).",
        rich_help_panel="Compression")] = None,
    accuracy_guard: Annotated[float | None, typer.Option(
        help="Pause shrinking while validation accuracy is more than this many points below its best.",
        rich_help_panel="Compression")] = None,
    validation_split: Annotated[float | None, typer.Option(
        help="Share of the training set held out for validation (default 0.1 with --accuracy-guard, else 0).",
        rich_help_panel="Compression")] = None,
    epochs: Annotated[int | None, typer.Option(help="Training epochs.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Mini-batch size.")] = None,
    lr: Annotated[float | None, typer.Option(help="SGD learning rate.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed for model, data order, dropout and rewiring.")] = None,
    wiring_seed: Annotated[int | None, typer.Option(
        help="Seed the initial wiring and weights with this instead of --seed: the same start network, "
             "other data order, dropout and rewiring draws.")] = None,
    new_weights: Annotated[str | None, typer.Option(
        help="Grown connections start at zero (default) or normal: N(0, new_weight_std²).")] = None,
    grace_steps: Annotated[int | None, typer.Option(
        min=0, help="A grown connection cannot be pruned for this many rewiring steps (default 0).")] = None,
    input_scaling: Annotated[str | None, typer.Option(
        help="global (one mean and std), pixel (per pixel) or unit ([0, 1]); default: the dataset's.")] = None,
    backend: Annotated[str | None, typer.Option(help=f"{', '.join(TRAIN_BACKENDS)} (dense = dense baseline).")] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:N or mps.")] = None,
    limit_train: Annotated[int | None, typer.Option(help="Train on the first N examples only.")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="Folder with the Fashion-MNIST IDX files.")] = None,
    save_topology_every: Annotated[int | None, typer.Option(
        help="Save the wiring every N epochs to RUN/topology/ (for similarity --over-epochs); 0: never.")] = None,
    out: Annotated[Path | None, typer.Option(help="Run directory (default runs/<preset>-<grow>-s<seed>).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the interrupted run in --out.")] = False,
    quiet: Annotated[bool, typer.Option(help="No progress bar or per-epoch lines.")] = False,
    plots: Annotated[bool, typer.Option(help="Write figures into <run>/figures at the end.")] = True,
    threads: Annotated[int | None, typer.Option(
        min=1, help="Threads for torch (default: from the model's work, 1 for the csr reference MLP, every "
                    "core for dense; OMP_NUM_THREADS, if set, decides).")] = None,
    nproc: Annotated[int, typer.Option(
        min=1, help="Data-parallel processes on this machine (starts torchrun; the batch size stays the "
                    "global batch). For several machines run torchrun yourself: see the README.")] = 1,
    set_values: Annotated[list[str] | None, typer.Option(
        "--set", help="KEY=VALUE for any setting of the config (repeatable; values in YAML), e.g. --set "
                      "hidden=[300,100] --set momentum=0.8. `synthprune list` names them.")] = None,
    grow_option: Annotated[list[str] | None, typer.Option(
        "--grow-option", help="KEY=VALUE option of the grow strategy (repeatable), e.g. --grow-option "
                              "kappa_end=2; `synthprune list` shows each strategy's options.")] = None,
    strategies: Annotated[list[str] | None, typer.Option(
        "--strategies", help="Import this module first (a dotted name or a .py file): the strategies it "
                             "registers become usable (docs/strategies.md). Repeatable.")] = None,
) -> None:
    """Train one model into a run directory.

    Writes config.yaml, metrics.csv, topology.jsonl, checkpoint.pt, final/ and figures/. Under
    torchrun it trains data-parallel; only rank 0 writes and prints."""
    from synthprune.train import fit  # keeps `synthprune --help` fast

    overrides = dict(
        grow=grow, prune=prune, epsilon=epsilon, zeta=zeta, zeta_schedule=zeta_schedule, endpoint=endpoint,
        rewire_every=rewire_every, rewire_until=rewire_until, wiring_seed=wiring_seed, new_weights=new_weights,
        grace_steps=grace_steps, input_scaling=input_scaling,
        epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, backend=backend, device=device,
        limit_train=limit_train, data_dir=str(data_dir) if data_dir else None, compress_to=compress_to,
        compress_scope=compress_scope, compress_start=compress_start, compress_end=compress_end,
        accuracy_guard=accuracy_guard, validation_split=validation_split, save_topology_every=save_topology_every,
    )
    for source in strategies or []:
        import_strategies(source)
    settings = train_settings(preset, config, overrides, set_values or [], grow_option or [], resume, out)
    if out is None:
        from synthprune.runs import configuration_name, run_name

        out = Path("runs") / run_name(configuration_name(settings, preset), settings.seed)
    if nproc > 1:
        arguments = {"preset": preset, "config": config, **overrides, "out": out, "resume": resume, "quiet": quiet,
                     "plots": plots, "set": set_values, "grow_option": grow_option, "strategies": strategies,
                     "threads": threads}
        from synthprune.distributed import launch_local

        raise typer.Exit(launch_local(nproc, ["train", *command_line(arguments)]))
    watch_parent()
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    speaks = os.environ.get("RANK", "0") == "0"  # under torchrun, rank 0 prints and plots
    quiet, plots = quiet or not speaks, plots and speaks
    show_bar = not quiet and console.is_terminal
    progress = (lambda total, epoch: EpochBar(total, epoch, settings.epochs)) if show_bar else None
    log = (lambda line: None) if quiet else (lambda line: console.print(line, highlight=False, soft_wrap=True))
    try:
        summary = fit(settings, out, resume=resume, progress=progress, log=log, auto_threads=threads is None)
    except ConfigError as exc:  # found only once the data is known (e.g. rewire_every vs the epoch)
        raise named_by_source(exc, overrides, parse_assignments(set_values or [], "--set")) from None
    except KeyboardInterrupt:
        if speaks:
            print(f"interrupted: finished epochs are checkpointed; continue with: synthprune train --resume "
                  f"--out {out}", file=sys.stderr)
        raise typer.Exit(130) from None
    if plots:
        from synthprune.plots import plot_runs

        plot_runs([out], Path(out) / "figures")
    if speaks:
        show(summary_table(f"{out}", summary))


def train_settings(preset: str, config: Path | None, overrides: dict, set_values: list[str], grow_option: list[str],
                   resume: bool, out: Path | None):
    """The config ``train`` runs: preset, then ``--config``, then ``--set`` and
    ``--grow-option``, then the flags (``overrides``, ``None`` = not given). A bad value is
    reported under the flag or file it came from. With ``--resume`` nothing may be given."""
    extra = parse_assignments(set_values, "--set")
    clash = sorted(k for k in extra if overrides.get(k) is not None)
    if clash:
        raise ValueError(f"--set {clash[0]} and --{clash[0].replace('_', '-')} both given: keep one")
    options = parse_assignments(grow_option, "--grow-option")
    if options:
        extra["grow_options"] = {**(extra.get("grow_options") or {}), **options}
    if resume:
        given = [f"--{k.replace('_', '-')}" for k, v in overrides.items() if v is not None]
        given += [f"--set {k}" for k in parse_assignments(set_values, "--set")] + \
            (["--grow-option"] if options else [])
        if given or config is not None:
            dropped = ", ".join(given) or "--config"
            raise ValueError(f"--resume continues with the run's saved config.yaml; drop {dropped}")
        if out is None:
            raise ValueError("--resume needs --out, the run directory to continue")
    try:
        settings = load_config(preset, config, **extra, **{k: v for k, v in overrides.items() if v is not None})
    except ConfigError as exc:
        raise named_by_source(exc, overrides, extra) from None
    if settings.compress_to is None:
        shaping = [f"--{k.replace('_', '-')}" for k in ("compress_scope", "compress_start", "compress_end")
                   if overrides[k] is not None]
        if shaping:
            raise ValueError(f"{shaping[0]} shapes compression, which is off: add --compress-to, or drop it")
    return settings


def named_by_source(exc: ConfigError, overrides: dict, extra: dict) -> ConfigError:
    """``exc`` naming the flag its value came from (``--flag``, ``--set key``,
    ``--grow-option``); unchanged when it came from a file or the preset."""
    if exc.key is not None and overrides.get(exc.key) is not None:
        return exc.named(f"--{exc.key.replace('_', '-')}")
    if exc.key == "grow_options" and "grow_options" in extra:
        return exc.named("--grow-option")
    if exc.key in extra:
        return exc.named(f"--set {exc.key}")
    return exc


def watch_parent() -> None:
    """A sweep's worker stops (as on Ctrl-C: checkpointed, exit 130) when its sweep dies,
    however it died -- SIGKILL included -- instead of training on as an orphan."""
    import signal
    import threading
    import time

    from synthprune.experiments import PARENT_ENV

    parent = os.environ.get(PARENT_ENV)
    if not parent:
        return
    # SIGINT is how the sweep stops its workers (and how this watch stops this one). A sweep
    # started as a shell's background job runs with SIGINT ignored, and its workers inherit
    # that: they trained on until the sweep's kill fallback 30 s later.
    signal.signal(signal.SIGINT, signal.default_int_handler)

    def watch() -> None:
        while os.getppid() == int(parent):
            time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=watch, daemon=True, name="sweep-parent-watch").start()


def command_line(options: dict[str, object]) -> list[str]:
    """Typer options back into arguments: ``{"epochs": 3, "resume": True, "plots": False}`` ->
    ``["--epochs", "3", "--resume", "--no-plots"]``; ``None`` and ``False`` flags are left out,
    a list repeats its flag."""
    args: list[str] = []
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        if name == "plots":
            args += [] if value else ["--no-plots"]
        elif isinstance(value, list):
            args += [part for item in value for part in (flag, str(item))]
        elif value is True:
            args.append(flag)
        elif value is not None and value is not False:
            args += [flag, str(value)]
    return args


@app.command()
def plot(
    runs: Annotated[list[Path], typer.Argument(help="One or more run directories.")],
    out: Annotated[Path | None, typer.Option(help="Folder for the PNGs (default: <run>/figures for one "
                                                  "run, ./figures for several).")] = None,
) -> None:
    """Figures from run directories.

    Test accuracy and connections per layer vs epoch (runs overlaid) and each run's input-layer
    connectivity as an image."""
    from synthprune.plots import plot_runs

    target = out or (runs[0] / "figures" if len(runs) == 1 else Path("figures"))
    for path in plot_runs(runs, target):
        console.print(f"wrote {path}", highlight=False)


@app.command()
def residual(
    run: Annotated[Path, typer.Argument(help="A finished run directory.")],
    form: Annotated[str, typer.Option(help="csr: sparse layers stay sparse (CSRLinear); dense: nn.Linear.")] = "csr",
) -> None:
    """Extract a run's compact residual network into RUN/final/residual/.

    Writes model.safetensors + config.json and shows what compaction removed. Load it with
    synthprune.load_residual."""
    from synthprune.export import write_residual
    from synthprune.residual import FORMS

    if form not in FORMS:
        raise ValueError(f"unknown form {form!r}; valid: {', '.join(FORMS)}")
    files = write_residual(run, form)
    show(residual_table(files))
    console.print(f"wrote {files.folder}/", highlight=False)


def residual_table(files) -> Table:
    s = files.summary
    table = Table(title="residual network", caption=f"the dense network: {s.dense_parameters:,} parameters, "
                                                    f"{files.dense_bytes:,} bytes")
    for column in ("", "before", "after"):
        table.add_column(column, justify="right")
    levels = ["inputs", *[f"hidden {i}" for i in range(1, len(s.neurons_before) - 1)], "outputs"]
    for level, before, after in zip(levels, s.neurons_before, s.neurons_after, strict=True):
        table.add_row(f"neurons: {level}", f"{before:,}", f"{after:,}")
    for i, (before, after) in enumerate(zip(s.connections_before, s.connections_after, strict=True), start=1):
        table.add_row(f"connections: layer {i}", f"{before:,}", f"{after:,}")
    table.add_row("connections", f"{sum(s.connections_before):,}", f"{sum(s.connections_after):,}")
    table.add_row("parameters", f"{s.parameters_before:,}", f"{s.parameters_after:,}")
    table.add_row("bytes on disk", f"{files.sparse_bytes:,}", f"{files.residual_bytes:,}")
    table.add_row("compression vs dense: parameters", f"{s.dense_parameters / s.parameters_before:.1f}x",
                  f"{s.dense_parameters / s.parameters_after:.1f}x")
    table.add_row("compression vs dense: bytes (float32)", f"{files.dense_bytes / files.sparse_bytes:.1f}x",
                  f"{files.dense_bytes / files.residual_bytes:.1f}x")
    if s.folded_neurons:
        table.add_row("neurons without inputs folded into a bias", "", f"{s.folded_neurons:,}")
    return table


@app.command()
def export(
    run: Annotated[Path, typer.Argument(help="A finished run directory.")],
    onnx: Annotated[bool, typer.Option("--onnx", help="Write the residual network as ONNX "
                                                      "(needs: pip install 'synthprune[onnx]').")] = False,
    out: Annotated[Path | None, typer.Option(help="Output file (default RUN/final/residual/model.onnx).")] = None,
    onnx_form: Annotated[str, typer.Option(
        help="auto: per layer, computed sparse at <= 2% density, else stored sparse and densified at load; "
             "sparse: every sparse layer computed sparse; densify: every one stored sparse, densified at "
             "load; dense: dense matrices (the largest file).")] = "auto",
) -> None:
    """Export a run's compact residual network for deployment (ONNX).

    Dynamic batch size; input: the flattened features, output: logits. The file grows with
    the connections, not with the dense shape, unless --onnx-form dense."""
    from synthprune.export import export_run_onnx
    from synthprune.onnx_graph import FORMS

    if not onnx:
        raise ValueError("choose a format: --onnx")
    if onnx_form not in FORMS:
        raise ValueError(f"--onnx-form must be one of {', '.join(FORMS)}, got {onnx_form!r}")
    written = export_run_onnx(run, out, onnx_form)
    console.print(f"wrote {written.path} ({written.bytes:,} bytes; {written.describe()})", highlight=False)


@app.command()
def sweep(
    out: Annotated[Path, typer.Option(help="Folder for the runs (OUT/<config>-s<seed>/), sweep.csv and summary.md.")],
    spec: Annotated[Path | None, typer.Option(
        help="A sweep YAML file: preset, seeds, common, and named `runs`.")] = None,
    preset: Annotated[str | None, typer.Option(help=f"Starting configuration: {', '.join(PRESETS)}.")] = None,
    grow: Annotated[str | None, typer.Option(help="Comma-separated grow strategies (and `dense` for the dense "
                                                  "baseline), e.g. none,random,synthesis.")] = None,
    compress_to: Annotated[str | None, typer.Option(help="Comma-separated compression targets; `full` = none, "
                                                         "e.g. full,0.01.")] = None,
    set_values: Annotated[list[str] | None, typer.Option("--set", help="KEY=V1,V2: another axis of the grid, "
                                                                       "e.g. --set endpoint=cdf,tail.")] = None,
    seeds: Annotated[str | None, typer.Option(help="Seeds, e.g. 0-4 or 0,1,2 (default 0).")] = None,
    epochs: Annotated[int | None, typer.Option(help="Epochs of every run.")] = None,
    jobs: Annotated[int | None, typer.Option(min=1, help="Runs at a time (default: the number of CPU cores).")] = None,
    threads: Annotated[int | None, typer.Option(
        min=1, help="Threads of each run (default: the cores divided between the jobs). One thread per job keeps "
             "runs that share a busy machine from collapsing.")] = None,
    strategies: Annotated[list[str] | None, typer.Option(
        "--strategies", help="Import this module first (a dotted name or a .py file), here and in every "
                             "worker: the strategies it registers become usable. Repeatable.")] = None,
) -> None:
    """Run many trainings: a grid or a sweep file, one worker process per run.

    The grid is grow strategies x compression targets x --set axes x seeds. Finished runs are
    skipped and interrupted ones resumed, so re-running a sweep completes it; a failed run is
    reported and the others go on."""
    from synthprune.experiments import grid, load_spec, parse_list, parse_seeds, plan, run_sweep

    for source in strategies or []:
        import_strategies(source)

    common: dict = {}
    seed_list = None
    if spec is not None:
        if grow or compress_to or set_values:
            raise ValueError("give either --spec or the grid flags (--grow, --compress-to, --set), not both")
        common, configs, seed_list = load_spec(spec)
        spec_preset = common.pop("preset", None)
        preset = preset or spec_preset
    else:
        configs = grid(parse_list(grow), parse_list(compress_to), set_values or [])
    if seeds is not None:
        seed_list = parse_seeds(seeds)
    if epochs is not None:
        common["epochs"] = epochs
    runs = plan(configs, seed_list or [0], out, preset, common)
    console.print(f"sweep: {len(configs)} configurations x {len(seed_list or [0])} seeds = {len(runs)} runs -> {out}",
                  highlight=False)
    progress = Progress(TextColumn("sweep"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=console, transient=True)
    task = progress.add_task("runs", total=len(runs))

    def done(result, action: str) -> None:
        verb = {"skipped": "already finished", "finished": "resumed and finished" if action == "resume"
                else "finished", "failed": "FAILED"}[result.status]
        detail = (f": {result.error}" if result.error else
                  f"  test {100 * result.summary['final_test_accuracy']:.2f}%  "
                  f"connections {result.summary['connections']:,}")
        progress.console.print(f"{result.run.label} {verb}{detail}", highlight=False)
        progress.advance(task)

    with progress if console.is_terminal else contextlib.nullcontext():
        results = run_sweep(runs, out, jobs, on_done=done, strategies=strategies or [], threads=threads)
    failed = [r for r in results if r.status == "failed"]
    console.print(f"wrote {out}/sweep.csv and {out}/summary.md" + (f"; {len(failed)} run(s) failed" if failed else ""),
                  highlight=False)
    if failed:
        raise typer.Exit(1)


@app.command(name="similarity")
def similarity_command(
    runs: Annotated[list[Path], typer.Argument(help="Run directories, residual network folders or topology "
                                                    "snapshots (two: a table; more: a matrix).")],
    match: Annotated[str, typer.Option(help="hungarian: also match hidden neurons across the networks "
                                            "(for different seeds); none: raw only.")] = "hungarian",
    residual: Annotated[bool, typer.Option(help="Compare residual sub-networks (neurons on an input-output "
                                                "path) rather than the whole wiring.")] = True,
    over_epochs: Annotated[bool, typer.Option(help="One run with itself over its saved snapshots "
                                                   "(train --save-topology-every N).")] = False,
    measure: Annotated[str | None, typer.Option(
        help="Matrix entry for several runs (default matched_edge_jaccard, or edge_jaccard with --match none).",
    )] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    out: Annotated[Path | None, typer.Option(help="Folder for the matrix CSV and heatmap (several runs; "
                                                  "default ./similarity).")] = None,
) -> None:
    """How alike the wirings of trained networks are.

    Node and edge Jaccard, overlap, and after matching hidden neurons, NNSTD (Liu et al. 2020).
    Overall figures pool the sparse layers."""
    import json

    from synthprune import compare as sim

    if over_epochs:
        if len(runs) != 1:
            raise ValueError("--over-epochs takes one run directory")
        rows = sim.over_epochs(runs[0], residual=residual)
        if json_output:
            print(json.dumps(rows, indent=2))
            return
        table = Table(title=f"{runs[0]}: wiring over epochs (edge Jaccard)")
        for column in ("epoch", "vs previous snapshot", "vs final"):
            table.add_column(column, justify="right")
        for row in rows:
            previous = "" if row["vs_previous"] is None else f"{row['vs_previous']:.3f}"
            table.add_row(str(row["epoch"]), previous, f"{row['vs_final']:.3f}")
        show(table)
        return
    if len(runs) < 2:
        raise ValueError("give two or more runs to compare (or one run with --over-epochs)")
    if len(runs) == 2:
        result = sim.similarity(runs[0], runs[1], match=match, residual=residual)
        if json_output:
            print(json.dumps(result.as_dict(), indent=2))
        else:
            show(similarity_table(result))
        return
    folder = out or Path("similarity")
    written = sim.write_matrix(runs, folder, match=match, residual=residual, measure=measure)
    for path in written:
        console.print(f"wrote {path}", highlight=False)


def similarity_table(result) -> Table:
    matched = result.match == "hungarian"
    table = Table(title=f"{result.a}  vs  {result.b}", caption="overall: pooled over the sparse layers")
    columns = ["layer", "connections", "node Jaccard", "edge Jaccard", "overlap"]
    if matched:
        columns += ["matched Jaccard", "matched overlap", "NNSTD"]
    for column in columns:
        table.add_column(column, justify="right")
    fmt = lambda v: "" if v is None else f"{v:.3f}"
    for layer in result.layers:
        row = [layer.layer + ("" if layer.sparse else " (dense)"),
               f"{layer.connections_a:,} / {layer.connections_b:,}",
               fmt(layer.node_jaccard), fmt(layer.edge_jaccard), fmt(layer.edge_overlap)]
        if matched:
            row += [fmt(layer.matched_edge_jaccard), fmt(layer.matched_edge_overlap), fmt(layer.nnstd)]
        table.add_row(*row)
    row = ["overall", "", f"inputs {fmt(result.input_jaccard)}", fmt(result.edge_jaccard), fmt(result.edge_overlap)]
    if matched:
        row += [fmt(result.matched_edge_jaccard), fmt(result.matched_edge_overlap), fmt(result.nnstd)]
    table.add_row(*row, style="bold")
    return table


@app.command()
def bench(
    quick: Annotated[bool, typer.Option(help="Small sizes and few repeats: a smoke test, not figures.")] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print the figures as JSON.")] = False,
    memory: Annotated[bool, typer.Option(help="Measure peak training memory (a fresh process each).")] = True,
    under_load: Annotated[bool, typer.Option(
        help="Instead: start one busy process per core, time a training step per backend at 1 thread, at "
             "every core and at train's default thread count, then stop the load.")] = False,
    threads: Annotated[int | None, typer.Option(
        min=1, help="Threads for torch while measuring (default: its own, the cores). --threads 1 gives "
                    "the one-thread figures of benchmarks/README.md.")] = None,
) -> None:
    """Measure speed and memory of the backends on the reference MLP.

    Training epoch time (dense, masked, csr at ε = 20 and 5), rewiring step per strategy, csr
    scaling with width, inference latency (dense, csr, residual network) and peak training
    memory. Contenders alternate within one process and medians are reported, so the ratios
    hold on a noisy machine."""
    import json

    from synthprune.bench import BenchSettings, run_bench

    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    settings = BenchSettings.quick() if quick else BenchSettings()
    settings.memory = memory
    def log(line: str) -> None:
        if json_output:
            print(line, file=sys.stderr)
        else:
            console.print(line, style="dim")

    if under_load:
        from synthprune.bench import bench_under_load

        result = {"under_load": bench_under_load(settings, log)}
        if json_output:
            print(json.dumps(result, indent=2))
        else:
            show(under_load_table(result["under_load"]))
        return
    result = run_bench(settings, log)
    if json_output:
        print(json.dumps(result, indent=2))
        return
    for table in bench_tables(result):
        show(table)


def under_load_table(r: dict) -> Table:
    t = Table(title=f"training step under load ({r['busy_processes']} busy processes), ms",
              caption=f"wall time, median; OpenMP wait policy {r['wait_policy']}; default: synthprune train's")
    for column in ("backend", "1 thread", "every core", "default", "default threads", "default / best"):
        t.add_column(column, justify="right")
    for backend in ("dense", "masked", "csr"):
        row = r[backend]
        t.add_row(backend, *(f"{1e3 * row[k]['step_seconds']:.1f}" for k in ("one_thread", "all_cores", "default")),
                  str(row["default"]["threads"]), f"{row['default_over_best']:.2f}x")
    return t


def bench_tables(r: dict) -> list[Table]:
    tables = []
    t = Table(title=f"training epoch ({r['settings']['batches_per_epoch']} batches of {r['settings']['batch']}), "
                    "seconds", caption=f"{r['machine']['threads']} threads, torch {r['machine']['torch']}")
    for column in ("ε", "connections (csr)", "dense", "masked", "csr", "dense / csr", "masked / csr"):
        t.add_column(column, justify="right")
    for row in r["training"].values():
        e = row["epoch_seconds"]
        t.add_row(f"{row['epsilon']:g}", f"{row['connections']['csr']:,}", f"{e['dense']:.2f}", f"{e['masked']:.2f}",
                  f"{e['csr']:.2f}", f"{row['dense_over_csr']:.2f}x", f"{row['masked_over_csr']:.2f}x")
    tables.append(t)
    t = Table(title="csr training step against the machine's limit",
              caption="limit: 3 multiply-adds per connection and example at the dense GEMM rate measured here; "
                      f"csr path: {r['machine'].get('csr_path', 'torch.sparse')}")
    torch_path = any("torch_sparse_over_fast" in row for row in r["training"].values())
    columns = ["ε", "GEMM rate (GMAC/s)", "limit (ms)", "csr step (ms)", "csr / limit"]
    columns += ["torch.sparse step (ms)", "torch.sparse / fast"] if torch_path else []
    for column in columns:
        t.add_column(column, justify="right")
    for row in r["training"].values():
        if "step_limit_seconds" in row:  # bench files from before the limit line lack it
            cells = [f"{row['epsilon']:g}", f"{row['gemm_multiply_adds_per_second'] / 1e9:.1f}",
                     f"{1e3 * row['step_limit_seconds']:.3f}", f"{1e3 * row['step_seconds']['csr']:.3f}",
                     f"{row['csr_over_limit']:.1f}x"]
            if torch_path:
                cells += [f"{1e3 * row['step_seconds']['csr_torch_sparse']:.3f}",
                          f"{row['torch_sparse_over_fast']:.2f}x"]
            t.add_row(*cells)
    tables.append(t)
    t = Table(title="rewiring step (csr, ε = 20)")
    for column in ("strategy", "seconds", "share of a csr epoch"):
        t.add_column(column, justify="right")
    for grow, row in r["rewiring"].items():
        t.add_row(grow, f"{row['seconds']:.3f}", f"{100 * row['share_of_epoch']:.2f}%")
    tables.append(t)
    t = Table(title="csr scaling (3 hidden layers, ε = 20, synthesis rewiring)")
    for column in ("width", "connections", "train step s", "rewire step s", "train µs / 1k connections"):
        t.add_column(column, justify="right")
    for width, row in r["scaling"].items():
        t.add_row(f"{int(width):,}", f"{row['connections']:,}", f"{row['train_step_seconds']:.4f}",
                  f"{row['rewire_step_seconds']:.3f}", f"{1e9 * row['train_step_seconds'] / row['connections']:.1f}")
    tables.append(t)
    inference = r["inference"]
    t = Table(title="inference latency, ms", caption="residual: the compact network of a csr MLP compressed to 1%")
    names = list(inference["batch1_ms"])  # dense, csr, residual, then their torch.sparse runs if any
    label = lambda name: (f"{name} ({inference['connections'][name]:,} conn.)" if name in inference["connections"]
                          else name.replace("_torch_sparse", " on torch.sparse"))
    for column in ("batch", *map(label, names)):
        t.add_column(column, justify="right")
    for batch in (1, 256):
        t.add_row(str(batch), *(f"{inference[f'batch{batch}_ms'][name]:.3f}" for name in names))
    tables.append(t)
    if r.get("memory_bytes"):
        m = r["memory_bytes"]
        t = Table(title="peak training memory (ε = 20)")
        for column in ("dense MB", "masked MB", "csr MB", "csr / dense"):
            t.add_column(column, justify="right")
        t.add_row(*(f"{m[k] / 2**20:.1f}" for k in ("dense", "masked", "csr")), f"{m['csr_over_dense']:.2f}")
        tables.append(t)
    return tables


@app.command(name="list")
def list_things(
    strategies: Annotated[list[str] | None, typer.Option(
        "--strategies", help="Import this module first (a dotted name or a .py file) and list its strategies "
                             "too. Repeatable.")] = None,
) -> None:
    """Presets, datasets, backends, strategies (with their options) and settings."""
    for source in strategies or []:
        import_strategies(source)
    strategies = list_strategies()
    console.print(f"presets:    {', '.join(PRESETS)}")
    console.print(f"datasets:   {', '.join(DATASETS)}")
    console.print(f"backends:   {', '.join(TRAIN_BACKENDS)}")
    console.print(f"prune:      {', '.join(strategies['prune'])}")
    for name in strategies["grow"]:
        options = ", ".join(f"{k}={v!r}" for k, v in grow_options(name).items())
        console.print(f"grow:       {name}" + (f"  ({options})" if options else ""))
    from synthprune.config import TrainConfig

    console.print(f"settings:   {', '.join(TrainConfig().to_dict())}  (train --set KEY=VALUE, --config FILE)")
    import torch

    console.print(f"threads:    train: from the model's work, at most {torch.get_num_threads()} (--threads N); "
                  "OpenMP wait policy "
                  f"{os.environ.get('OMP_WAIT_POLICY', 'unset (active spinning)')}")
    from synthprune import csr_kernel

    console.print(f"csr path:   {csr_kernel.describe()}", highlight=False)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code. Errors in what the user gave are one line, code 2."""
    from synthprune.allocator import reuse_freed_memory
    from synthprune.distributed import SynchronizationError
    from synthprune.train import TrainingError

    reuse_freed_memory()  # no page faults for the buffers each step frees and allocates again
    command = typer.main.get_command(app)
    try:
        # Non-standalone mode returns an exit code (from --help, typer.Exit) or the command's value.
        code = command.main(args=argv, prog_name="synthprune", standalone_mode=False)
    except typer.Exit as exc:
        return exc.exit_code
    except CLI_ERRORS as exc:  # usage errors: bad option, bad value, missing argument
        print(f"error: {exc.format_message()} (see --help)", file=sys.stderr)
        return exc.exit_code
    except (typer.Abort, KeyboardInterrupt):
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError) as exc:
        _report(exc)
        return 2
    except (TrainingError, SynchronizationError) as exc:
        _report(exc)
        return 1
    return code if isinstance(code, int) else 0


def _report(exc: Exception) -> None:
    """One line on stderr; in a torchrun job an error every rank shares is printed by rank 0 only."""
    if not getattr(exc, "reported_by_main", False):
        print(f"error: {exc}", file=sys.stderr)


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())
