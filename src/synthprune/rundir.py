"""The run directory (DESIGN §4): what training writes, always atomically, one writer at a time.

``runs/<name>/``: ``config.yaml`` (resolved), ``metrics.csv`` (one row per epoch),
``topology.jsonl`` (one line per rewiring step and layer), ``checkpoint.pt`` (model, optimizer,
rewirer, epoch, RNG states, the records so far; loadable with ``weights_only=True``),
``final/`` (``model.safetensors`` with the wiring, then ``config.json``), ``figures/``, and
``.lock`` (held by the process writing the run).

A run's states, from the files alone:

* **unstarted** -- ``config.yaml`` but no ``checkpoint.pt``: no epoch finished (a crash, a NaN
  or Ctrl-C in the first epoch). Nothing is lost by starting it again: a new start with the same
  ``--out`` reuses the directory, and ``--resume`` restarts it from its ``config.yaml``.
* **interrupted** -- a ``checkpoint.pt``, no complete ``final/``: ``--resume`` continues it.
* **finished** -- ``final/config.json`` exists. It is written last, after
  ``final/model.safetensors``, so a run killed between the two is interrupted, not finished, and
  ``--resume`` writes its final files again from the last checkpoint.

Every file is written to a temporary name and renamed into place, so an interrupted run never
leaves a half-written file and never destroys a finished run's results.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import torch
import yaml

from synthprune.files import (
    FileFormatError,
    FolderLock,
    atomic_write,
    clean_temporaries,
    load_torch,
    read_csv_rows,
    read_yaml,
)

__all__ = ["RunDir", "atomic_write"]

START_AGAIN = "delete the run directory (or choose another --out) to start again"


class RunDir:
    """Paths and atomic readers/writers of one run directory."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.config = self.root / "config.yaml"
        self.metrics = self.root / "metrics.csv"
        self.topology = self.root / "topology.jsonl"
        self.checkpoint = self.root / "checkpoint.pt"
        self.final = self.root / "final"
        self.figures = self.root / "figures"
        self.snapshots = self.root / "topology"
        self.lock = FolderLock(self.root)

    def snapshot(self, epoch: int) -> Path:
        """Where ``train --save-topology-every`` writes the wiring after ``epoch`` (0: initial)."""
        return self.snapshots / f"epoch-{epoch:04d}.safetensors"

    def is_finished(self) -> bool:
        """Whether both final files are in place (``config.json`` is written last)."""
        return (self.final / "config.json").is_file() and (self.final / "model.safetensors").is_file()

    def is_unstarted(self) -> bool:
        """A run whose first epoch never finished: ``config.yaml`` and no checkpoint."""
        return self.config.exists() and not self.checkpoint.exists() and not self.is_finished()

    def prepare(self, config: dict, resume: bool) -> str:
        """Lock the folder for this process, then decide what the run does; returns
        ``"start"`` (a new run; ``config`` is written), ``"restart"`` (an unstarted run begun
        again, by a new start or by ``resume``; the caller says so) or ``"resume"``.

        Refuses to start over a run that has a checkpoint, to resume a finished run, and to
        write a folder another process is writing. Removes what killed writes left."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / ".write-test"
            probe.write_text("")
            probe.unlink()
        except OSError as exc:
            raise ValueError(f"cannot write to run directory {self.root}: {exc.strerror or exc}") from exc
        self.lock.acquire()
        try:
            action = self._decide(resume)
        except BaseException:
            self.lock.release()
            raise
        clean_temporaries(self.root)
        if not resume:  # a new start, or one over an unstarted run: its config is this one
            atomic_write(self.config, yaml.safe_dump(config, sort_keys=False))
        return action

    def _decide(self, resume: bool) -> str:
        if self.is_finished():
            if resume:
                raise ValueError(f"{self.root} is already finished; nothing to resume")
            raise ValueError(f"{self.root} already holds a run, a finished one: choose another --out")
        if self.checkpoint.exists():
            if resume:
                return "resume"
            raise ValueError(f"{self.root} already holds a run: pass --resume to continue it, or another --out")
        if self.config.exists():
            return "restart"
        if resume:
            raise ValueError(f"{self.root} holds no run to resume (no config.yaml); start one without --resume")
        return "start"

    def release(self) -> None:
        self.lock.release()

    def read_config(self) -> dict:
        if not self.config.is_file():
            raise ValueError(f"{self.root} is not a run directory (no config.yaml)")
        return read_yaml(self.config, START_AGAIN)

    def write_records(self, metrics: list[dict], topology: list[dict]) -> None:
        if metrics:
            buffer = io.StringIO()
            writer = csv.DictWriter(buffer, fieldnames=list(metrics[0]))
            writer.writeheader()
            writer.writerows(metrics)
            atomic_write(self.metrics, buffer.getvalue())
        atomic_write(self.topology, "".join(json.dumps(_json_safe(r)) + "\n" for r in topology))

    def read_metrics(self) -> list[dict]:
        """metrics.csv as a list of rows with numbers parsed (epoch, test_accuracy and the
        connection counts are checked to be numbers)."""
        if not self.metrics.is_file():
            raise ValueError(f"{self.root} has no metrics.csv (has it trained an epoch?)")
        todo = "it is written by synthprune train; restore it from the checkpoint's run or train again"
        rows = [{k: _number(v) for k, v in row.items()}
                for row in read_csv_rows(self.metrics, todo, required=("epoch", "test_accuracy", "connections"))]
        if not rows:
            raise FileFormatError(self.metrics, "has no rows", todo)
        for line, row in enumerate(rows, start=2):
            bad = [k for k in ("epoch", "test_accuracy", "connections") if isinstance(row[k], str)]
            if bad:
                raise FileFormatError(self.metrics, f"line {line}: {', '.join(bad)} is not a number", todo)
        return rows

    def save_checkpoint(self, state: dict) -> None:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        atomic_write(self.checkpoint, buffer.getvalue())

    def load_checkpoint(self, map_location: str | torch.device = "cpu") -> dict:
        return load_torch(self.checkpoint, START_AGAIN, map_location)


def _json_safe(record: dict) -> dict:
    """NaN is not JSON: write it as null."""
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in record.items()}


def _number(text: str) -> int | float | str:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text
