"""Schedules that take the step explicitly: when to rewire, in optimizer steps
(:class:`RewireSchedule`), how much to rewire at rewiring step t (:class:`ZetaSchedule`) and
how many connections each layer has while it shrinks (:class:`CompressionPlan`). Apart from
:class:`RewireSchedule`, steps are the Rewirer's rewiring steps, numbered from 0."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

__all__ = ["ZETA_SCHEDULES", "CompressionPlan", "RewireSchedule", "ZetaSchedule", "cubic_count", "zeta_at"]

ZETA_SCHEDULES = ("constant", "cosine")


def zeta_at(step: int, zeta: float, schedule: str = "constant", total_steps: int | None = None) -> float:
    """Fraction of connections to rewire at rewiring step ``step`` (0-based).

    ``"constant"``: ζ every step (SET). ``"cosine"``: ``ζ/2 · (1 + cos(π·t/T))`` with
    ``T = total_steps``, reaching 0 at ``T`` (RigL's decay).
    """
    if schedule == "constant":
        return zeta
    if schedule == "cosine":
        if not total_steps or total_steps < 1:
            raise ValueError("zeta_schedule='cosine' needs total_steps >= 1 (the number of rewiring steps)")
        return 0.5 * zeta * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))
    raise ValueError(f"unknown zeta_schedule {schedule!r}; valid: {', '.join(ZETA_SCHEDULES)}")


def cubic_count(initial: int, final: int, done: int, total: int) -> int:
    """Connections after ``done`` of ``total`` shrinking steps on Zhu & Gupta's (2017) cubic
    schedule: ``final + (initial - final)·(1 - done/total)³``.

    Shrinks fast while many redundant connections remain and slowly near the target. Rounded
    up, so the count never overshoots the target, never grows, and equals ``final`` exactly
    from ``done == total`` on.
    """
    if total < 1:
        raise ValueError(f"the compression schedule needs at least one step, got {total}")
    remaining = max(0.0, 1.0 - min(done, total) / total)
    return final + math.ceil((initial - final) * remaining**3 - 1e-9)


@dataclass(frozen=True)
class ZetaSchedule:
    """ζ at each rewiring step: ``constant`` (SET) or ``cosine`` (RigL's decay over
    ``total_steps``). Checked when built; it has no state of its own."""

    zeta: float = 0.3
    kind: str = "constant"
    total_steps: int | None = None

    def __post_init__(self) -> None:
        if not 0 < self.zeta < 1:
            raise ValueError(f"zeta must be in (0, 1), got {self.zeta!r}")
        if self.kind not in ZETA_SCHEDULES:
            raise ValueError(f"unknown zeta_schedule {self.kind!r}; valid: {', '.join(ZETA_SCHEDULES)}")
        zeta_at(0, self.zeta, self.kind, self.total_steps)  # cosine needs total_steps

    def at(self, step: int) -> float:
        if self.kind == "cosine" and step >= self.total_steps:
            warnings.warn(f"the cosine zeta schedule ended after total_steps={self.total_steps} rewiring steps: "
                          f"zeta is 0 at step {step} and later, so nothing is rewired; give total_steps = the "
                          "number of rewiring steps the run makes", UserWarning, stacklevel=3)
        return zeta_at(step, self.zeta, self.kind, self.total_steps)


@dataclass(frozen=True)
class RewireSchedule:
    """When to rewire, in optimizer steps (rigl-torch's ``delta`` and ``T_end``): after
    optimizer step ``s`` (counted from 1) when ``s`` is a multiple of ``every`` and, if
    ``until`` is given, ``s < until``. Stateless: the caller passes the step."""

    every: int
    until: int | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.every, int) and self.every >= 1):
            raise ValueError(f"every must be a whole number of optimizer steps >= 1, got {self.every!r}")
        if self.until is not None and not (isinstance(self.until, int) and self.until >= 1):
            raise ValueError(f"until must be a whole number of optimizer steps >= 1 (or None), got {self.until!r}")

    def due(self, step: int) -> bool:
        """Whether to rewire after optimizer step ``step``."""
        return step > 0 and step % self.every == 0 and (self.until is None or step < self.until)

    def count(self, total_steps: int) -> int:
        """Rewiring steps in a run of ``total_steps`` optimizer steps (one after the last
        step included)."""
        last = total_steps if self.until is None else min(total_steps, self.until - 1)
        return max(0, last) // self.every


@dataclass
class CompressionPlan:
    """Each sparse layer's count while compressing: from ``initial_counts`` to
    ``final_counts`` on the cubic schedule over rewiring steps ``start_step`` ..
    ``end_step`` (inclusive). A step that shrinks advances the plan (:meth:`advance`); a
    paused one (an accuracy guard) does not, so a paused run reaches the target later.

    ``state_dict`` holds what a resumed run needs: the counts compression started from (not
    those of the model as rebuilt) and the steps done."""

    initial_counts: list[int]
    final_counts: list[int]
    start_step: int
    end_step: int
    steps_done: int = 0
    _steps: int = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not 0 <= self.start_step <= self.end_step:
            raise ValueError(f"compression steps must satisfy 0 <= compress_start_step <= compress_end_step, "
                             f"got {self.start_step}, {self.end_step}")
        self._steps = self.end_step - self.start_step + 1

    def targets(self, step: int) -> list[int] | None:
        """Each layer's count after rewiring step ``step``, or ``None`` before the plan starts."""
        if step < self.start_step:
            return None
        return [cubic_count(initial, final, self.steps_done + 1, self._steps)
                for initial, final in zip(self.initial_counts, self.final_counts, strict=True)]

    def advance(self) -> None:
        self.steps_done += 1

    def state_dict(self) -> dict:
        return {"initial_counts": list(self.initial_counts), "final_counts": list(self.final_counts),
                "shrink_steps_done": self.steps_done}

    def load_state_dict(self, state: dict) -> None:
        self.initial_counts = [int(c) for c in state["initial_counts"]]
        self.final_counts = [int(c) for c in state["final_counts"]]
        self.steps_done = int(state["shrink_steps_done"])
