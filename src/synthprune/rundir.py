"""The run directory (DESIGN §4): what training writes, always atomically.

``runs/<name>/``: ``config.yaml`` (resolved), ``metrics.csv`` (one row per epoch),
``topology.jsonl`` (one line per rewiring step and layer), ``checkpoint.pt`` (model, optimizer,
rewirer, epoch, RNG states, the records so far; loadable with ``weights_only=True``),
``final/`` (``model.safetensors`` with the wiring, ``config.json``), ``figures/``.

Every file is written to a temporary name and renamed into place, so an interrupted run never
leaves a half-written file and never destroys a finished run's results.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
from pathlib import Path

import torch
import yaml

__all__ = ["RunDir", "atomic_write"]


def atomic_write(path: Path, data: bytes | str) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder and ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data.encode() if isinstance(data, str) else data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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

    def snapshot(self, epoch: int) -> Path:
        """Where ``train --save-topology-every`` writes the wiring after ``epoch`` (0: initial)."""
        return self.snapshots / f"epoch-{epoch:04d}.safetensors"

    def is_finished(self) -> bool:
        return (self.final / "model.safetensors").is_file()

    def prepare(self, config: dict, resume: bool) -> None:
        """Create the folder (checking it is writable); refuse to start over an existing run."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / ".write-test"
            probe.write_text("")
            probe.unlink()
        except OSError as exc:
            raise ValueError(f"cannot write to run directory {self.root}: {exc.strerror or exc}") from exc
        if not resume and (self.config.exists() or self.checkpoint.exists()):
            raise ValueError(f"{self.root} already holds a run: pass --resume to continue it, or another --out")
        if resume and self.is_finished():
            raise ValueError(f"{self.root} is already finished; nothing to resume")
        if resume and not self.checkpoint.exists():
            raise ValueError(f"{self.root} has no checkpoint.pt to resume from")
        if not resume:
            atomic_write(self.config, yaml.safe_dump(config, sort_keys=False))

    def read_config(self) -> dict:
        if not self.config.is_file():
            raise ValueError(f"{self.root} is not a run directory (no config.yaml)")
        return yaml.safe_load(self.config.read_text())

    def write_records(self, metrics: list[dict], topology: list[dict]) -> None:
        if metrics:
            buffer = io.StringIO()
            writer = csv.DictWriter(buffer, fieldnames=list(metrics[0]))
            writer.writeheader()
            writer.writerows(metrics)
            atomic_write(self.metrics, buffer.getvalue())
        atomic_write(self.topology, "".join(json.dumps(_json_safe(r)) + "\n" for r in topology))

    def read_metrics(self) -> list[dict]:
        """metrics.csv as a list of rows with numbers parsed."""
        if not self.metrics.is_file():
            raise ValueError(f"{self.root} has no metrics.csv (has it trained an epoch?)")
        with self.metrics.open() as handle:
            return [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(handle)]

    def save_checkpoint(self, state: dict) -> None:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        atomic_write(self.checkpoint, buffer.getvalue())

    def load_checkpoint(self, map_location: str | torch.device = "cpu") -> dict:
        try:
            return torch.load(self.checkpoint, map_location=map_location, weights_only=True)
        except Exception as exc:  # corrupt or foreign file: say which and what to do
            raise ValueError(f"cannot load {self.checkpoint} ({exc.__class__.__name__}: {exc}); "
                             "delete the run directory to start again") from exc


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
