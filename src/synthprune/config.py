"""Training configuration: one typed dataclass, named presets, YAML files, validation."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from synthprune.compression import COMPRESS_SCOPES, parse_target
from synthprune.data import DATASETS
from synthprune.layers import BACKENDS, INITS
from synthprune.models import ACTIVATIONS
from synthprune.schedules import ZETA_SCHEDULES
from synthprune.strategies import list_strategies

__all__ = ["PRESETS", "TRAIN_BACKENDS", "TrainConfig", "load_config"]

TRAIN_BACKENDS = (*BACKENDS, "dense")


@dataclass
class TrainConfig:
    """Everything a training run depends on. Defaults are the reference experiment
    (``fmnist-mlp``, DESIGN §5): Fashion-MNIST, MLP 784-1000-1000-1000-10, SET-style rewiring."""

    dataset: str = "fashion-mnist"  # fashion-mnist | digits
    data_dir: str | None = None  # folder with the IDX files (default: Debian's dataset-fashion-mnist)
    limit_train: int | None = None  # train on the first N examples only (quick runs)
    hidden: list[int] = field(default_factory=lambda: [1000, 1000, 1000])  # hidden layer widths
    activation: str = "relu"
    dropout: float = 0.3  # after every hidden activation
    backend: str = "csr"  # csr | masked | dense (the dense baseline: no sparsity, no rewiring)
    epsilon: float = 20.0  # Erdős–Rényi: ε·(n_in+n_out) connections per sparse layer
    dense_output: bool = True  # keep the output layer dense (as SET's code does)
    init: str = "sparse_kaiming"  # weight init: sparse_kaiming | dense_default
    prune: str = "set"  # prune criterion
    grow: str = "synthesis"  # grow strategy; none = static sparse
    zeta: float = 0.3  # fraction of connections rewired after each epoch
    zeta_schedule: str = "constant"  # constant | cosine
    endpoint: str = "cdf"  # synthesis: endpoint rule, cdf | tail
    kappa_start: float = 0.0  # synthesis: start nodes need strength z-score >= this
    kappa_end: float = 1.0  # synthesis (tail): endpoints need z-score >= this
    compress_to: float | int | None = None  # shrink the sparse layers to: < 1 a density, >= 1 a count
    compress_scope: str = "global"  # global (one total, shared in proportion) | layer (each layer)
    compress_start: int = 1  # the budget first shrinks after this epoch...
    compress_end: int | None = None  # ...and reaches the target after this one (default: 3/4 of the run)
    accuracy_guard: float | None = None  # pause shrinking while validation acc is > this many points below best
    validation_split: float | None = None  # share of the training set held out (default 0.1 with the guard)
    epochs: int = 20
    batch_size: int = 128
    lr: float = 0.01  # SGD learning rate
    momentum: float = 0.9
    weight_decay: float = 2e-4
    seed: int = 0  # seeds the model, data order, dropout and rewiring
    save_topology_every: int = 0  # save the wiring (topology/epoch-NNNN.safetensors) every N epochs; 0: never
    device: str = "cpu"  # cpu | cuda | cuda:N | mps

    @property
    def sparse(self) -> bool:
        return self.backend != "dense"

    def grow_options(self) -> dict:
        if self.grow != "synthesis":
            return {}
        return {"endpoint": self.endpoint, "kappa_start": self.kappa_start, "kappa_end": self.kappa_end}

    @property
    def compress_epochs(self) -> tuple[int, int]:
        """(first, last) epoch after which the budget shrinks (1-based, inclusive)."""
        end = self.compress_end if self.compress_end is not None else max(
            self.compress_start, math.ceil(0.75 * (self.epochs - 1)))
        return self.compress_start, end

    @property
    def validation_fraction(self) -> float:
        if self.validation_split is not None:
            return self.validation_split
        return 0.1 if self.accuracy_guard is not None else 0.0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> TrainConfig:
        """Raise ``ValueError`` naming the first bad value and the valid ones; returns ``self``
        with ``compress_to`` normalised (a whole count becomes an ``int``)."""
        strategies = list_strategies()
        choices = {
            "dataset": DATASETS, "backend": TRAIN_BACKENDS, "activation": tuple(ACTIVATIONS), "init": INITS,
            "prune": tuple(strategies["prune"]), "grow": tuple(strategies["grow"]),
            "zeta_schedule": ZETA_SCHEDULES, "endpoint": ("cdf", "tail"), "compress_scope": COMPRESS_SCOPES,
        }
        for name, valid in choices.items():
            if getattr(self, name) not in valid:
                raise ValueError(f"unknown {name} {getattr(self, name)!r}; valid: {', '.join(valid)}")
        checks = [
            ("zeta", 0 < self.zeta < 1, "in (0, 1)"),
            ("epsilon", self.epsilon > 0, "> 0"),
            ("dropout", 0 <= self.dropout < 1, "in [0, 1)"),
            ("epochs", self.epochs >= 1, ">= 1"),
            ("batch_size", self.batch_size >= 1, ">= 1"),
            ("lr", self.lr > 0, "> 0"),
            ("momentum", 0 <= self.momentum < 1, "in [0, 1)"),
            ("weight_decay", self.weight_decay >= 0, ">= 0"),
            ("limit_train", self.limit_train is None or self.limit_train >= 1, ">= 1"),
            ("save_topology_every", self.save_topology_every >= 0, ">= 0"),
            ("hidden", len(self.hidden) >= 1 and all(int(h) >= 1 for h in self.hidden), "a list of widths >= 1"),
            ("validation_split", self.validation_split is None or 0 <= self.validation_split < 1, "in [0, 1)"),
            ("accuracy_guard", self.accuracy_guard is None or self.accuracy_guard > 0, "> 0 (accuracy points)"),
        ]
        for name, ok, rule in checks:
            if not ok:
                raise ValueError(f"{name} must be {rule}, got {getattr(self, name)!r}")
        self._validate_compression()
        try:
            device = torch.device(self.device)
        except RuntimeError as exc:
            raise ValueError(f"unknown device {self.device!r}; valid: cpu, cuda, cuda:N, mps") from exc
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r} requested but CUDA is not available here; use --device cpu")
        return self

    def _validate_compression(self) -> None:
        if self.compress_to is None:
            if self.accuracy_guard is not None:
                raise ValueError("accuracy_guard pauses compression: it needs compress_to")
            return
        self.compress_to = parse_target(self.compress_to)
        if not self.sparse:
            raise ValueError("compress_to needs a sparse backend (csr or masked), not the dense baseline")
        if self.epochs < 2:
            raise ValueError("compress_to needs epochs >= 2: the budget shrinks at the rewiring steps between epochs")
        start, end = self.compress_epochs
        if not 1 <= start <= end <= self.epochs - 1:
            raise ValueError(f"compression epochs must satisfy 1 <= compress_start <= compress_end <= epochs - 1 "
                             f"(the last rewiring step is after epoch {self.epochs - 1}), got {start} and {end}")
        if self.accuracy_guard is not None and self.validation_fraction == 0:
            raise ValueError("accuracy_guard needs held-out validation data: validation_split > 0")


PRESETS: dict[str, dict] = {
    # DESIGN §5 exactly: the reference experiment.
    "fmnist-mlp": {},
    # A small, fast set-up for tests and quick checks (scikit-learn's 8x8 digits).
    "digits-mlp": {
        "dataset": "digits", "hidden": [128, 128], "epsilon": 5.0, "dropout": 0.0,
        "epochs": 10, "batch_size": 32, "lr": 0.05,
    },
}


def _number(name: str, value) -> float:
    """A float setting: ints and numeric strings too -- YAML 1.1 (PyYAML) reads ``1e-3`` as a
    string, and users write it that way."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None


def _from_dict(values: dict) -> TrainConfig:
    valid = [f.name for f in dataclasses.fields(TrainConfig)]
    unknown = sorted(set(values) - set(valid))
    if unknown:
        raise ValueError(f"unknown config key(s) {unknown}; valid: {', '.join(valid)}")
    types = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
    for name, value in values.items():
        if value is None:
            continue
        if types[name] in ("float", "float | None"):
            values[name] = _number(name, value)
        elif types[name] in ("int", "int | None") and not (isinstance(value, int) and not isinstance(value, bool)):
            raise ValueError(f"{name} must be an integer, got {value!r}")
    return TrainConfig(**values).validate()


def load_config(preset: str | None = None, path: str | Path | None = None, **overrides) -> TrainConfig:
    """Resolve a configuration: a preset, then a YAML file on top, then ``overrides`` (``None``
    means "not given")."""
    name = preset or "fmnist-mlp"
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid: {', '.join(PRESETS)}")
    values = {**TrainConfig().to_dict(), **PRESETS[name]}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise ValueError(f"cannot read config {path}: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ValueError(f"config {path} must be a YAML mapping of settings")
        values.update(loaded)
    values.update({k: v for k, v in overrides.items() if v is not None})
    return _from_dict(values)
