"""Copy the records of finished runs into the repository: config.yaml, metrics.csv,
topology.jsonl, final/config.json (summary) and the final wiring as a topology snapshot
(int32 keys, no weights; MLPs only). Never checkpoints or weights. Runs already collected
are refreshed and sweep.csv rows are merged by configuration and seed; the next session
extends the folder instead of starting over.

    python experiments/collect.py RUNS_FOLDER experiments/results/NAME
"""

from __future__ import annotations

import csv
import shutil
import sys
from pathlib import Path

import torch

from synthprune.compact import is_mlp
from synthprune.files import load_safetensors
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
            save_wiring(model, out / "wiring.safetensors", epoch=config.epochs)
        done.append(run.name)
    if (folder / "sweep.csv").is_file():
        merge_sweep_rows(folder / "sweep.csv", target / "sweep.csv")
    return done


def save_wiring(model, path: Path, epoch: int) -> None:
    """The final wiring as a snapshot, left untouched where the file already holds the same
    wiring (files written before the metadata order was fixed differ in bytes only)."""
    fresh = path.with_name(path.name + ".new")
    save_snapshot(model, fresh, epoch=epoch)
    if path.is_file():
        (old, old_meta), (new, new_meta) = (load_safetensors(p, "collect it again") for p in (path, fresh))
        if old_meta == new_meta and old.keys() == new.keys() and all(torch.equal(old[k], new[k]) for k in old):
            fresh.unlink()
            return
    fresh.replace(path)


def merge_sweep_rows(source: Path, target: Path) -> None:
    """Add ``source``'s rows to ``target``'s (one row per configuration and seed; a finished row
    replaces an older one), with run paths relative to the runs folder: collecting a later
    sweep into the same results adds to its table instead of replacing it."""
    def rows(path: Path) -> list[dict]:
        if not path.is_file():
            return []
        with path.open(newline="") as handle:
            return list(csv.DictReader(handle))

    merged = {(r["config"], r["seed"]): r for r in rows(target)}
    for row in rows(source):
        row["run"] = f"runs/{source.parent.name}/{Path(row['run']).name}"
        key = (row["config"], row["seed"])
        if row["status"] in ("finished", "skipped") or key not in merged:
            merged[key] = {**row, "status": "finished" if row["status"] == "skipped" else row["status"]}
    if not merged:
        return
    columns = list(next(iter(merged.values())))
    with target.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, columns)
        writer.writeheader()
        writer.writerows(merged[key] for key in sorted(merged, key=lambda k: (k[0], int(k[1]))))


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    names = collect(Path(sys.argv[1]), Path(sys.argv[2]))
    print(f"collected {len(names)} runs into {sys.argv[2]}: {', '.join(names)}")
