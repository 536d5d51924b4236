"""Compression targets (DESIGN §2.4): how many connections each sparse layer ends with.

``compress_to`` is read the same way everywhere (library, CLI, YAML):

* a number below 1 is a final **density** (connections / dense weights),
* a number of 1 or more is a final **connection count** (it must be a whole number),
* a mapping ``{layer name: density or count}`` gives each named layer its own target.

With ``scope="layer"`` a single number applies to every sparse layer on its own. With
``scope="global"`` it applies to all sparse layers together, and the total is shared out in
proportion to the layers' current counts (so an Erdős–Rényi or ERK distribution keeps its
shape), never giving a layer less than one connection per output neuron.

A target is refused before training when it would grow a layer, or leave fewer connections than
output neurons (some output neuron would have no input).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = ["COMPRESS_SCOPES", "LayerShape", "final_counts", "parse_target"]

COMPRESS_SCOPES = ("global", "layer")


@dataclass(frozen=True)
class LayerShape:
    """What target resolution needs to know of a sparse layer."""

    name: str
    n_in: int
    n_out: int
    count: int  # connections now

    @property
    def slots(self) -> int:
        return self.n_in * self.n_out


def parse_target(value: float | int | str) -> float | int:
    """``"0.01"`` / ``0.01`` -> density 0.01; ``"5000"`` / ``5000`` / ``5000.0`` -> count 5000."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"compress_to must be a density below 1 or a connection count, got {value!r}") from None
    if not math.isfinite(number) or number <= 0:
        raise ValueError(f"compress_to must be a density in (0, 1) or a connection count >= 1, got {value!r}")
    if number < 1:
        return number
    if number != int(number):
        raise ValueError(f"compress_to={value!r} is >= 1, so it is a connection count and must be a whole number")
    return int(number)


def _resolve(target: float | int, slots: int) -> int:
    return round(target * slots) if isinstance(target, float) else target


Target = float | int | str


def final_counts(layers: Sequence[LayerShape], compress_to: Target | Mapping[str, Target],
                 scope: str = "global") -> list[int]:
    """Final connection count of each layer, in order; raises ``ValueError`` if infeasible."""
    if scope not in COMPRESS_SCOPES:
        raise ValueError(f"unknown compress scope {scope!r}; valid: {', '.join(COMPRESS_SCOPES)}")
    if isinstance(compress_to, Mapping):
        names = [layer.name for layer in layers]
        unknown = sorted(set(compress_to) - set(names))
        if unknown:
            raise ValueError(f"compress_to names unknown layer(s) {unknown}; sparse layers: {', '.join(names)}")
        finals = [_resolve(parse_target(compress_to[layer.name]), layer.slots) if layer.name in compress_to
                  else layer.count for layer in layers]
    elif scope == "layer":
        target = parse_target(compress_to)
        finals = [_resolve(target, layer.slots) for layer in layers]
    else:
        target = parse_target(compress_to)
        total = _resolve(target, sum(layer.slots for layer in layers))
        current = sum(layer.count for layer in layers)
        minimum = sum(layer.n_out for layer in layers)
        if total > current:
            raise ValueError(f"compress_to={compress_to!r} means {total:,} connections in all sparse layers, more "
                             f"than the {current:,} they start with: compression only shrinks")
        if total < minimum:
            raise ValueError(f"compress_to={compress_to!r} means {total:,} connections in all sparse layers, fewer "
                             f"than their {minimum:,} output neurons: each needs at least one input")
        finals = _share(total, [layer.count for layer in layers], [layer.n_out for layer in layers])
    for layer, final in zip(layers, finals, strict=True):
        if final > layer.count:
            raise ValueError(f"compress_to={compress_to!r} gives layer {layer.name} {final:,} connections, more "
                             f"than the {layer.count:,} it starts with: compression only shrinks")
        if final < layer.n_out:
            raise ValueError(f"compress_to={compress_to!r} gives layer {layer.name} {final:,} connections, fewer "
                             f"than its {layer.n_out:,} output neurons: each needs at least one input")
    return finals


def _share(total: int, weights: list[int], minimums: list[int]) -> list[int]:
    """Split ``total`` in proportion to ``weights``, each part at least its minimum, exact sum
    (largest remainder). Needs ``sum(minimums) <= total <= sum(weights)``."""
    fixed: dict[int, int] = {}
    while True:
        free = [i for i in range(len(weights)) if i not in fixed]
        budget = total - sum(fixed.values())
        weight = sum(weights[i] for i in free)
        ideal = {i: budget * weights[i] / weight for i in free}
        short = [i for i in free if ideal[i] < minimums[i]]
        if not short:
            break
        fixed.update({i: minimums[i] for i in short})  # water-filling: clamp, then share the rest
    parts = {i: math.floor(x) for i, x in ideal.items()}
    leftover = budget - sum(parts.values())
    for i in sorted(free, key=lambda i: parts[i] - ideal[i])[:leftover]:
        parts[i] += 1
    parts.update(fixed)
    return [parts[i] for i in range(len(weights))]
