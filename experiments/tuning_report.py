"""The method's best chance (issue 16, item 5), from committed records alone: for each growth
rule, its reference settings (the seed-0 runs of long.yaml) and each one-knob variant of
tuning.yaml, scored by the best validation accuracy of the run (never test); the variant with the
highest is the rule's tuned setting. Test accuracy at that epoch is shown, not used.

Then the tuned rules on test (tuned.yaml: the chosen settings with seeds 1 and 2): the test
accuracy at the epoch chosen on validation, mean and 95% t-interval over the seeds, paired by
seed against the same rule at its reference settings and against tuned SET.

    python experiments/tuning_report.py [TUNING_RECORDS] [BASE_RECORDS]
    (default: experiments/results/tuning-e60 and experiments/results/long-e60)

Rules whose variants are not all recorded yet say how many are missing.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import yaml

from synthprune.experiments import mean_ci
from synthprune.runs import chosen_epoch

RULES = {"random": "SET (random)", "synthesis": "synthesis (cdf)", "synthesis_tail": "synthesis (tail)",
         "gradient": "RigL (gradient)"}
SPEC = Path(__file__).resolve().parent / "tuning.yaml"


def best_epoch(metrics: Path) -> dict:
    """The row of the epoch the run is chosen at on validation (``synthprune.runs.chosen_epoch``)."""
    return chosen_epoch([{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(metrics.open())])


def selection(tuning: Path, base: Path, seed: int = 0) -> dict[str, Path]:
    """Print the selection table; return ``{rule: folder of its chosen setting's seed-0 run}``."""
    planned = list(yaml.safe_load(SPEC.read_text())["runs"])
    print("| rule | setting | best validation acc % | test acc at that epoch % | chosen |")
    print("|---|---|---|---|---|")
    chosen_runs = {}
    for rule, label in RULES.items():
        candidates = {"reference": base / f"{rule}-full-s{seed}" / "metrics.csv"}
        variants = [name for name in planned if name.rpartition("-")[0] == rule]
        candidates |= {name.rpartition("-")[2]: tuning / f"{name}-s{seed}" / "metrics.csv" for name in variants}
        scored = {name: best_epoch(path) for name, path in candidates.items() if path.is_file()}
        if not scored:
            continue
        chosen = max(scored, key=lambda name: scored[name]["validation_accuracy"])
        chosen_runs[rule] = candidates[chosen].parent
        for name, row in scored.items():
            print(f"| {label} | {name} | {100 * row['validation_accuracy']:.2f} | {100 * row['test_accuracy']:.2f} "
                  f"| {'**yes**' if name == chosen else ''} |")
        missing = len(candidates) - len(scored)
        if missing:
            print(f"| {label} | ({missing} of {len(candidates)} settings not run yet) | | | |")
    return chosen_runs


def seeds_of(run: Path) -> dict[int, float]:
    """``{seed: test accuracy at the chosen epoch}`` of every recorded seed of ``run``'s setting."""
    stem = run.name.rpartition("-s")[0]
    return {int(path.parent.name.rpartition("-s")[2]): best_epoch(path)["test_accuracy"]
            for path in sorted(run.parent.glob(f"{stem}-s*/metrics.csv"))}


def tuned_on_test(chosen_runs: dict[str, Path], base: Path) -> None:
    """The tuned rules on test, paired by seed against their reference settings and tuned SET."""
    tuned = {rule: seeds_of(run) for rule, run in chosen_runs.items()}
    print("\n| rule | tuned setting | seeds | test acc at best val. (%, 95% CI) "
          "| paired vs its reference settings (points) | paired vs tuned SET (points) |")
    print("|---|---|---|---|---|---|")
    for rule, scores in tuned.items():
        is_reference = chosen_runs[rule].parent == base
        columns = []
        for other, itself in ((seeds_of(base / f"{rule}-full-s0"), is_reference),
                              (tuned.get("random", {}), rule == "random")):
            common = sorted(set(scores) & set(other))
            columns.append("—" if itself or not common else mean_ci([scores[s] - other[s] for s in common]))
        setting = "reference" if is_reference else chosen_runs[rule].name.rpartition("-s")[0]
        print(f"| {RULES[rule]} | {setting} | {len(scores)} | {mean_ci(list(scores.values()))} | "
              + " | ".join(columns) + " |")


def main(tuning: Path, base: Path) -> None:
    tuned_on_test(selection(tuning, base), base)


if __name__ == "__main__":
    arguments = sys.argv[1:]
    main(Path(arguments[0]) if arguments else Path("experiments/results/tuning-e60"),
         Path(arguments[1]) if len(arguments) > 1 else Path("experiments/results/long-e60"))
