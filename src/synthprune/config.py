"""Training configuration: one typed dataclass, named presets, YAML files, validation.

Every configuration -- a preset with flags, a ``--config`` file, a sweep's runs, the
``config.yaml`` a resume reads back, a finished run's ``final/config.json`` -- becomes a
:class:`TrainConfig` through one function, :meth:`TrainConfig.from_dict`, which checks the type
and range of every value and raises :class:`ConfigError` naming the key.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from synthprune.compression import COMPRESS_SCOPES, parse_target
from synthprune.data import DATASETS, INPUT_SCALINGS
from synthprune.layers import BACKENDS, INITS
from synthprune.models import ACTIVATIONS
from synthprune.rewiring import NEW_WEIGHTS
from synthprune.schedules import ZETA_SCHEDULES
from synthprune.strategies import grow_options, list_strategies

__all__ = [
    "PRESETS", "TRAIN_BACKENDS", "ConfigError", "TrainConfig", "config_from_file", "load_config", "parse_assignments",
]

TRAIN_BACKENDS = (*BACKENDS, "dense")
MODELS = ("mlp", "cnn")
MAX_SEED = 2**32 - 1  # the data order seeds a generator with seed·100003 + epoch: keep it in 64 bits
SYNTHESIS_FIELDS = ("endpoint", "kappa_start", "kappa_end")  # synthesis options with fields of their own


class ConfigError(ValueError):
    """A bad configuration value. ``key`` is the ``TrainConfig`` field it concerns (or ``None``);
    ``template`` says what is wrong, with ``{key}`` where the key goes (in front if absent), so
    the command line can show the flag or file the value came from instead (:meth:`named`)."""

    def __init__(self, key: str | None, template: str) -> None:
        if key is not None and "{key}" not in template:
            template = "{key} " + template
        self.key, self.template = key, template
        super().__init__(template.replace("{key}", key or ""))

    def named(self, where: str) -> ConfigError:
        """The same error with the key shown as ``where`` (``--flag``, or ``file: key``)."""
        error = ConfigError(self.key, self.template)
        error.args = (self.template.replace("{key}", where) if self.key else f"{where}: {self.template}",)
        return error


@dataclass
class TrainConfig:
    """Everything a training run depends on. Defaults are the reference experiment
    (``fmnist-mlp``, DESIGN §5): Fashion-MNIST, MLP 784-1000-1000-1000-10, SET-style rewiring."""

    dataset: str = "fashion-mnist"  # fashion-mnist | digits
    data_dir: str | None = None  # folder with the IDX files (default: Debian's dataset-fashion-mnist)
    limit_train: int | None = None  # train on the first N examples only (quick runs)
    input_scaling: str | None = None  # global | pixel | unit (default: global for fashion-mnist, unit for digits)
    model: str = "mlp"  # mlp | cnn (LeNet-5-like: 5x5 convolutions with 2x2 pooling, then the hidden layers)
    channels: list[int] = field(default_factory=lambda: [6, 16])  # cnn: channels of each convolution
    hidden: list[int] = field(default_factory=lambda: [1000, 1000, 1000])  # hidden layer widths
    activation: str = "relu"
    dropout: float = 0.3  # after every hidden activation
    backend: str = "csr"  # csr | masked | dense (the dense baseline: no sparsity, no rewiring)
    epsilon: float = 20.0  # Erdős–Rényi: ε·(n_in+n_out) connections per sparse layer
    density: float | None = None  # instead of epsilon: this density in every sparse layer
    dense_output: bool = True  # keep the output layer dense (as SET's code does)
    init: str = "sparse_kaiming"  # weight init: sparse_kaiming | dense_default
    prune: str = "set"  # prune criterion
    grow: str = "synthesis"  # grow strategy; none = static sparse
    zeta: float = 0.3  # fraction of connections rewired after each epoch
    zeta_schedule: str = "constant"  # constant | cosine
    new_weights: str = "zero"  # grown connections start at zero | normal (N(0, new_weight_std²))
    new_weight_std: float = 0.01
    grace_steps: int = 0  # newly grown connections cannot be pruned for this many rewiring steps
    rewire_every: int | None = None  # rewire after every N optimizer steps (default: after each epoch)
    rewire_until: int | None = None  # no rewiring at or after this optimizer step (RigL's T_end)
    endpoint: str = "cdf"  # synthesis: endpoint rule, cdf | tail (also grow_options: {endpoint: tail})
    kappa_start: float = 0.0  # synthesis: start nodes need strength z-score >= this
    kappa_end: float = 1.0  # synthesis (tail): endpoints need z-score >= this
    grow_options: dict = field(default_factory=dict)  # options of the grow strategy, e.g. {temperature: 2}
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
    wiring_seed: int | None = None  # seeds the initial wiring and weights instead of seed (same start, other draws)
    save_topology_every: int = 0  # save the wiring (topology/epoch-NNNN.safetensors) every N epochs; 0: never
    device: str = "cpu"  # cpu | cuda | cuda:N | mps

    @property
    def sparse(self) -> bool:
        return self.backend != "dense"

    def strategy_options(self) -> dict:
        """The keyword options the grow strategy is called with: ``grow_options``, and for
        synthesis its three settings with their own fields (kept for existing configs)."""
        if self.grow != "synthesis":
            return dict(self.grow_options)
        return {"endpoint": self.endpoint, "kappa_start": self.kappa_start, "kappa_end": self.kappa_end,
                **self.grow_options}

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

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        """The one way in: check keys, types and ranges of ``values`` (a mapping of fields,
        any subset) and return the validated config. Raises :class:`ConfigError`."""
        if not isinstance(values, dict):
            raise ConfigError(None, f"a configuration must be a mapping of settings, not {type(values).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(fields), key=str)
        if unknown:
            raise ConfigError(None, f"unknown config key(s) {unknown}; valid: {', '.join(fields)}")
        typed = {name: _typed(name, str(fields[name].type), value) for name, value in values.items()}
        options = dict(typed.get("grow_options") or {})
        for alias in SYNTHESIS_FIELDS:  # grow_options: {endpoint: tail} is the field endpoint: tail
            if alias in options:
                typed[alias] = _typed(alias, str(fields[alias].type), options.pop(alias))
        typed["grow_options"] = options
        return cls(**typed).validate()

    def validate(self) -> TrainConfig:
        """Raise :class:`ConfigError` naming the first bad value and the valid ones; returns
        ``self`` with ``compress_to`` normalised (a whole count becomes an ``int``)."""
        strategies = list_strategies()
        choices = {
            "dataset": DATASETS, "model": MODELS, "backend": TRAIN_BACKENDS, "activation": tuple(ACTIVATIONS),
            "init": INITS,
            "prune": tuple(strategies["prune"]), "grow": tuple(strategies["grow"]),
            "zeta_schedule": ZETA_SCHEDULES, "endpoint": ("cdf", "tail"), "new_weights": NEW_WEIGHTS,
            "input_scaling": INPUT_SCALINGS, "compress_scope": COMPRESS_SCOPES,
        }
        for name, valid in choices.items():
            optional = name == "input_scaling" and self.input_scaling is None  # None: the dataset's own
            if getattr(self, name) not in valid and not optional:
                own = name in ("grow", "prune")
                hint = " (a strategy of your own: load its module with --strategies)" if own else ""
                raise ConfigError(name, f"unknown {{key}} {getattr(self, name)!r}; valid: {', '.join(valid)}{hint}")
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
            ("seed", 0 <= self.seed <= MAX_SEED, f"in [0, {MAX_SEED}]"),
            ("wiring_seed", self.wiring_seed is None or 0 <= self.wiring_seed <= MAX_SEED, f"in [0, {MAX_SEED}]"),
            ("new_weight_std", self.new_weight_std > 0, "> 0"),
            ("grace_steps", self.grace_steps >= 0, ">= 0 rewiring steps"),
            ("hidden", isinstance(self.hidden, list) and len(self.hidden) >= 1
             and all(_is_int(h) and h >= 1 for h in self.hidden), "a list of whole widths >= 1, e.g. [1000, 1000]"),
            ("channels", isinstance(self.channels, list) and len(self.channels) >= 1
             and all(_is_int(c) and c >= 1 for c in self.channels), "a list of channel counts >= 1, e.g. [6, 16]"),
            ("density", self.density is None or 0 < self.density <= 1, "in (0, 1]"),
            ("rewire_every", self.rewire_every is None or self.rewire_every >= 1, ">= 1 optimizer steps"),
            ("rewire_until", self.rewire_until is None or self.rewire_until >= 1, ">= 1 optimizer steps"),
            ("validation_split", self.validation_split is None or 0 <= self.validation_split < 1, "in [0, 1)"),
            ("accuracy_guard", self.accuracy_guard is None or self.accuracy_guard > 0, "> 0 (accuracy points)"),
        ]
        for name, ok, rule in checks:
            if not ok:
                raise ConfigError(name, f"must be {rule}, got {getattr(self, name)!r}")
        for name in ("epsilon", "density", "zeta", "new_weight_std", "lr", "momentum", "weight_decay", "dropout",
                     "kappa_start", "kappa_end", "accuracy_guard", "validation_split"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise ConfigError(name, f"must be a finite number, got {value!r}")
        valid_options = grow_options(self.grow)
        unknown = sorted(set(self.grow_options) - set(valid_options), key=str)
        if unknown:
            raise ConfigError("grow_options", f"{unknown} are not options of grow {self.grow!r}; valid: "
                                              f"{', '.join(valid_options) or 'none'}")
        if self.dataset != "fashion-mnist" and self.data_dir is not None:
            raise ConfigError("data_dir", f"is for the fashion-mnist IDX files; dataset {self.dataset!r} is "
                                          "shipped with its package: drop it")
        self._validate_compression()
        self._validate_device()
        return self

    def _validate_device(self) -> None:
        try:
            device = torch.device(self.device)
        except (RuntimeError, TypeError):
            raise ConfigError("device", f"must be cpu, cuda, cuda:N or mps; got {self.device!r}") from None
        if device.type not in ("cpu", "cuda", "mps"):
            raise ConfigError("device", f"must be cpu, cuda, cuda:N or mps; got {self.device!r}")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device", f"{self.device!r} requested but CUDA is not available here; use cpu")
        if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError("device", f"{self.device!r}: this machine has {torch.cuda.device_count()} GPU(s)")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise ConfigError("device", f"{self.device!r} requested but MPS is not available here; use cpu")

    def _validate_compression(self) -> None:
        if self.compress_to is None:
            given = [name for name, default in (("compress_start", 1), ("compress_end", None),
                                                ("compress_scope", "global"), ("accuracy_guard", None))
                     if getattr(self, name) != default]
            if given:
                raise ConfigError(given[0], "shapes compression, which is off: set compress_to too, or drop it")
            return
        try:
            self.compress_to = parse_target(self.compress_to)
        except ValueError as exc:
            raise ConfigError("compress_to", str(exc).replace("compress_to", "{key}", 1)) from None
        if not self.sparse:
            raise ConfigError("compress_to", "needs a sparse backend (csr or masked), not the dense baseline")
        if self.epochs < 2:
            raise ConfigError("compress_to", "needs epochs >= 2: the budget shrinks at the rewiring steps "
                                             "between epochs")
        start, end = self.compress_epochs
        if not 1 <= start <= end <= self.epochs - 1:
            raise ConfigError("compress_start", f"and compress_end must satisfy 1 <= compress_start <= "
                                                f"compress_end <= epochs - 1 (the last rewiring step is after "
                                                f"epoch {self.epochs - 1}), got {start} and {end}")
        if self.accuracy_guard is not None and self.validation_fraction == 0:
            raise ConfigError("accuracy_guard", "needs held-out validation data: validation_split > 0")


PRESETS: dict[str, dict] = {
    # DESIGN §5 exactly: the reference experiment.
    "fmnist-mlp": {},
    # A small, fast set-up for tests and quick checks (scikit-learn's 8x8 digits).
    # A LeNet-5-like CNN on Fashion-MNIST: its convolutions and hidden layers 20% dense.
    "fmnist-cnn": {"model": "cnn", "channels": [6, 16], "hidden": [120, 84], "density": 0.2, "dropout": 0.0},
    "digits-mlp": {
        "dataset": "digits", "hidden": [128, 128], "epsilon": 5.0, "dropout": 0.0,
        "epochs": 10, "batch_size": 32, "lr": 0.05,
    },
}


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _typed(name: str, kind: str, value: object) -> object:
    """``value`` checked against the field's annotation (a string under ``from __future__
    import annotations``); floats also from ints and numeric strings -- YAML 1.1 (PyYAML)
    reads ``1e-3`` as a string, and users write it that way."""
    optional = kind.endswith(" | None")
    if value is None:
        if optional:
            return None
        raise ConfigError(name, "must be given (it has no 'none' value)")
    base = kind.removesuffix(" | None")
    if base == "float":
        if isinstance(value, bool):
            raise ConfigError(name, f"must be a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(name, f"must be a number, got {value!r}") from None
    if base == "int":
        if isinstance(value, float) and value.is_integer() and abs(value) < 2**63:
            value = int(value)
        if not _is_int(value):
            raise ConfigError(name, f"must be a whole number, got {value!r}")
        return value
    if base == "str":
        if not isinstance(value, str):
            raise ConfigError(name, f"must be a string, got {value!r}")
        return value
    if base == "bool":
        if not isinstance(value, bool):
            raise ConfigError(name, f"must be true or false, got {value!r}")
        return value
    if base == "list[int]":
        if not isinstance(value, list) or not all(_is_int(v) for v in value):
            raise ConfigError(name, f"must be a list of whole widths >= 1, e.g. [1000, 1000]; got {value!r}")
        return list(value)
    if base == "dict":
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ConfigError(name, f"must be a mapping of option names to values, got {value!r}")
        if not all(v is None or isinstance(v, (bool, int, float, str)) for v in value.values()):
            raise ConfigError(name, f"values must be numbers, strings or booleans, got {value!r}")
        return dict(value)
    if base == "float | int":  # compress_to: checked by parse_target
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(name, f"must be a density below 1 or a connection count, got {value!r}")
        return value
    raise AssertionError(f"no type check for {name}: {kind}")  # a new field needs one here


def parse_assignments(items: list[str], flag: str) -> dict[str, object]:
    """``["hidden=[300, 100]", "lr=1e-3"]`` -> ``{"hidden": [300, 100], "lr": 0.001}``: each value
    read as YAML (numbers, lists, true/false, strings); ``-`` in keys may be written for ``_``."""
    result: dict[str, object] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise ValueError(f"{flag} takes KEY=VALUE, got {item!r}")
        try:
            result[key] = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            result[key] = text  # not YAML: the text itself
    return result


def load_config(preset: str | None = None, path: str | Path | None = None, **overrides) -> TrainConfig:
    """Resolve a configuration: a preset, then a YAML file on top, then ``overrides`` (``None``
    means "not given"). A bad value raises :class:`ConfigError` (with a file: naming it)."""
    from synthprune.files import read_yaml

    name = preset or "fmnist-mlp"
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid: {', '.join(PRESETS)}")
    values = {**TrainConfig().to_dict(), **PRESETS[name]}
    if path is not None:
        loaded = read_yaml(path, "fix the file or pass the settings as flags")
        try:
            TrainConfig.from_dict({**values, **loaded})
        except ConfigError as exc:  # a bad value in the file: name the file
            if exc.key is None or exc.key in loaded:
                raise _in_file(exc, path) from None
        values.update(loaded)
    given = {k: v for k, v in overrides.items() if v is not None}
    if isinstance(given.get("grow_options"), dict) and isinstance(values.get("grow_options"), dict):
        given["grow_options"] = {**values["grow_options"], **given["grow_options"]}  # options add up
    values.update(given)
    return TrainConfig.from_dict(values)


def config_from_file(values: dict, path: str | Path) -> TrainConfig:
    """:meth:`TrainConfig.from_dict` of what a file held; an error names the file and key."""
    try:
        return TrainConfig.from_dict(values)
    except ConfigError as exc:
        raise _in_file(exc, path) from None


def _in_file(error: ConfigError, path: str | Path) -> ConfigError:
    if error.key is None:
        return error.named(str(path))
    named = error.named(error.key)
    named.args = (f"{path}: {named.args[0]}",)
    return named
