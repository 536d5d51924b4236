"""The long-training report (issue 16) from committed records alone: per configuration, the test
accuracy of the epoch chosen on validation (never on test), mean and 95% t-interval over seeds,
and paired differences against SET and static sparse by seed (same seed = same data order and
initial wiring), with their 95% t-intervals; compressed runs against SET compressed to the same
budget and static sparse trained at that budget from the start. Also the learning curves (validation accuracy).

    python experiments/long_report.py [RECORDS] [FIGURE]
    (default: experiments/results/long-e60 and docs/figures/long_curves.png)

Cells with fewer than two seeds have no interval and say so.
"""

from __future__ import annotations

import csv
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from scipy import stats

from synthprune.experiments import mean_ci
from synthprune.runs import chosen_epoch

REFERENCES = {"random-full": "SET", "none-full": "static"}
# Compressed runs (long_compression.yaml) are compared at their own budget: against SET
# compressed to it, against static sparse trained at that budget from the start, and against
# synthesis compressed to it.
BUDGET = re.compile(r"-c(?P<budget>[0-9.]+)$|^static-final-(?P<final>[0-9.]+)$")
BUDGET_REFERENCES = {"random-c{}": "SET at the budget", "static-final-{}": "static at the budget",
                     "synthesis-c{}": "synthesis at the budget"}


def references(name: str) -> dict[str, str]:
    """``{reference configuration: label}`` for the paired columns of ``name``."""
    found = BUDGET.search(name)
    if found is None:
        return REFERENCES
    budget = found["budget"] or found["final"]
    return {pattern.format(budget): label for pattern, label in BUDGET_REFERENCES.items()}


def read(folder: Path) -> dict[str, dict[int, list[dict]]]:
    """``{configuration: {seed: metrics rows}}`` from ``<configuration>-s<seed>/metrics.csv``."""
    runs: dict[str, dict[int, list[dict]]] = defaultdict(dict)
    for path in sorted(folder.glob("*-s*/metrics.csv")):
        name, _, seed = path.parent.name.rpartition("-s")
        rows = [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(path.open())]
        runs[name][int(seed)] = rows
    return runs


def chosen(rows: list[dict]) -> float:
    """Test accuracy at the epoch chosen on validation, among the epochs at the run's final
    connection count (``synthprune.runs.chosen_epoch``): a compressing run is scored at its
    budget, never at an earlier, larger network."""
    return chosen_epoch(rows)["test_accuracy"]


def table(runs: dict[str, dict[int, list[dict]]]) -> str:
    compressed = any(BUDGET.search(name) for name in runs)
    labels = list(BUDGET_REFERENCES.values()) if compressed else list(REFERENCES.values())
    lines = ["| configuration | seeds | epochs | test acc at best val. (%, 95% CI) | "
             + " | ".join(f"paired vs {label} (points)" for label in labels) + " |",
             "|---|---|---|---|" + "---|" * len(labels)]
    for name, seeds in sorted(runs.items()):
        scores = {seed: chosen(rows) for seed, rows in seeds.items()}
        paired = []
        for reference in references(name):
            common = sorted(set(scores) & set(runs.get(reference, {})))
            if name == reference or not common:
                paired.append("—")
                continue
            paired.append(mean_ci([scores[s] - chosen(runs[reference][s]) for s in common]))
        paired += ["—"] * (len(labels) - len(paired))
        epochs = {int(rows[-1]["epoch"]) for rows in seeds.values()}
        lines.append(f"| {name} | {len(seeds)} | {'/'.join(map(str, sorted(epochs)))} | "
                     f"{mean_ci(list(scores.values()))} | " + " | ".join(paired) + " |")
    return "\n".join(lines)


def curves(runs: dict[str, dict[int, list[dict]]], figure: Path) -> None:
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for name, seeds in sorted(runs.items()):
        length = min(len(rows) for rows in seeds.values())
        mean = [100 * statistics.fmean(rows[e]["validation_accuracy"] for rows in seeds.values())
                for e in range(length)]
        ax.plot(range(1, length + 1), mean, label=f"{name} ({len(seeds)} seed{'s' * (len(seeds) > 1)})")
    ax.set(xlabel="epoch", ylabel="validation accuracy (%)", title="Learning curves (mean over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    figure.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(figure, dpi=110)
    plt.close(fig)


def residual_connections(record: Path) -> int | None:
    """Connections of the residual network of a record's final wiring (``None`` without one)."""
    from synthprune.wiring import load_snapshot

    wiring = record / "wiring.safetensors"
    return sum(int(k.numel()) for k in load_snapshot(wiring).residual().keys) if wiring.is_file() else None


def accuracy_vs_size(folder: Path, runs: dict[str, dict[int, list[dict]]], figure: Path) -> None:
    """Test accuracy at the chosen epoch (mean and 95% t-interval over seeds) against the
    residual network's connections, one line per rule across the budgets."""
    rules: dict[str, list[tuple[float, float, float]]] = defaultdict(list)
    for name, seeds in runs.items():
        sizes = [residual_connections(folder / f"{name}-s{seed}") for seed in seeds]
        if None in sizes:
            continue
        scores = [100 * chosen(rows) for rows in seeds.values()]
        half = (stats.t.ppf(0.975, len(scores) - 1) * statistics.stdev(scores) / len(scores) ** 0.5
                if len(scores) > 1 else 0.0)
        found = BUDGET.search(name)
        rule = name[:found.start()] if found and found["budget"] else "static-final" if found else name
        rules[rule].append((statistics.fmean(sizes), statistics.fmean(scores), half))
    if not rules:
        return
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for rule, points in sorted(rules.items()):
        points.sort()
        ax.errorbar([p[0] for p in points], [p[1] for p in points], yerr=[p[2] for p in points], marker="o",
                    capsize=3, label=rule)
    ax.set(xscale="log", xlabel="residual connections (dense output layer included)",
           ylabel="test accuracy at best validation (%)", title="Accuracy against size (95% CI over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(figure, dpi=110)
    plt.close(fig)


def main(folder: Path, figure: Path) -> None:
    runs = read(folder)
    if not runs:
        sys.exit(f"{folder}: no <configuration>-s<seed>/metrics.csv records")
    print(table(runs))
    curves(runs, figure)
    print(f"\nlearning curves: {figure}")
    if any(BUDGET.search(name) for name in runs):
        sized = figure.with_name(figure.stem + "_size" + figure.suffix)
        accuracy_vs_size(folder, runs, sized)
        print(f"accuracy against size: {sized}")


if __name__ == "__main__":
    arguments = sys.argv[1:]
    main(Path(arguments[0]) if arguments else Path("experiments/results/long-e60"),
         Path(arguments[1]) if len(arguments) > 1 else Path("docs/figures/long_curves.png"))
