"""Schedules that take the step explicitly (no hidden state): how much to rewire at step t."""

from __future__ import annotations

import math

__all__ = ["ZETA_SCHEDULES", "cubic_count", "zeta_at"]

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
