"""The method's best chance (issue 16, item 5), from committed records alone: for each growth
rule, its reference settings (the seed-0 runs of long.yaml) and each one-knob variant of
tuning.yaml, scored by the best validation accuracy of the run (never test); the variant with the
highest is the rule's tuned setting. Test accuracy at that epoch is shown, not used.

    python experiments/tuning_report.py [TUNING_RECORDS] [BASE_RECORDS]
    (default: experiments/results/tuning-e60 and experiments/results/long-e60)

Rules whose variants are not all recorded yet say how many are missing.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import yaml

from synthprune.runs import chosen_epoch

RULES = {"random": "SET (random)", "synthesis": "synthesis (cdf)", "synthesis_tail": "synthesis (tail)",
         "gradient": "RigL (gradient)"}
SPEC = Path(__file__).resolve().parent / "tuning.yaml"


def best_epoch(metrics: Path) -> dict:
    """The row of the epoch the run is chosen at on validation (``synthprune.runs.chosen_epoch``)."""
    return chosen_epoch([{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(metrics.open())])


def main(tuning: Path, base: Path, seed: int = 0) -> None:
    planned = list(yaml.safe_load(SPEC.read_text())["runs"])
    print("| rule | setting | best validation acc % | test acc at that epoch % | chosen |")
    print("|---|---|---|---|---|")
    for rule, label in RULES.items():
        candidates = {"reference": base / f"{rule}-full-s{seed}" / "metrics.csv"}
        variants = [name for name in planned if name.rpartition("-")[0] == rule]
        candidates |= {name.rpartition("-")[2]: tuning / f"{name}-s{seed}" / "metrics.csv" for name in variants}
        scored = {name: best_epoch(path) for name, path in candidates.items() if path.is_file()}
        if not scored:
            continue
        chosen = max(scored, key=lambda name: scored[name]["validation_accuracy"])
        for name, row in scored.items():
            print(f"| {label} | {name} | {100 * row['validation_accuracy']:.2f} | {100 * row['test_accuracy']:.2f} "
                  f"| {'**yes**' if name == chosen else ''} |")
        missing = len(candidates) - len(scored)
        if missing:
            print(f"| {label} | ({missing} of {len(candidates)} settings not run yet) | | | |")


if __name__ == "__main__":
    arguments = sys.argv[1:]
    main(Path(arguments[0]) if arguments else Path("experiments/results/tuning-e60"),
         Path(arguments[1]) if len(arguments) > 1 else Path("experiments/results/long-e60"))
