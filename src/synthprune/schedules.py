"""Schedules that take the step explicitly: how much to rewire at rewiring step t
(:class:`ZetaSchedule`) and how many connections each layer has while it shrinks
(:class:`CompressionPlan`). Steps are the Rewirer's rewiring steps, numbered from 0."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

__all__ = ["ZETA_SCHEDULES", "CompressionPlan", "ZetaSchedule", "cubic_count", "zeta_at"]

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
        return zeta_at(step, self.zeta, self.kind, self.total_steps)


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
