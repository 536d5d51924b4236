"""Copy the records of finished runs into the repository: config.yaml, metrics.csv,
topology.jsonl, final/config.json (summary) and the final wiring as a topology snapshot
(int32 keys, no weights; MLPs only). Never checkpoints or weights. Runs already collected
are refreshed; the next session extends the folder instead of starting over.

    python experiments/collect.py RUNS_FOLDER experiments/results/NAME
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from synthprune.compact import is_mlp
from synthprune.rundir import RunDir
from synthprune.runs import load_run_model
from synthprune.wiring import save_snapshot

RECORDS = ("config.yaml", "metrics.csv", "topology.jsonl")


def collect(folder: Path, target: Path) -> list[str]:
    done = []
    for run in sorted(p for p in folder.iterdir() if p.is_dir() and RunDir(p).is_finished()):
        out = target / run.name
        out.mkdir(parents=True, exist_ok=True)
        for name in RECORDS:
            if (run / name).is_file():
                shutil.copyfile(run / name, out / name)
        shutil.copyfile(run / "final" / "config.json", out / "final.json")
        model, config = load_run_model(run)
        if config.sparse and is_mlp(model):
            save_snapshot(model, out / "wiring.safetensors", epoch=config.epochs)
        done.append(run.name)
    for name in ("sweep.csv", "summary.md"):
        if (folder / name).is_file():
            shutil.copyfile(folder / name, target / name)
    return done


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    names = collect(Path(sys.argv[1]), Path(sys.argv[2]))
    print(f"collected {len(names)} runs into {sys.argv[2]}: {', '.join(names)}")
