"""The schedule objects: ζ per step, and the compression plan with its state."""

import pytest
import torch

from synthprune import Rewirer, SparseMLP
from synthprune.schedules import CompressionPlan, RewireSchedule, ZetaSchedule


def test_zeta_schedules():
    assert ZetaSchedule(0.3).at(7) == 0.3
    cosine = ZetaSchedule(0.4, "cosine", total_steps=4)
    assert cosine.at(0) == pytest.approx(0.4) and cosine.at(3) > 0
    with pytest.warns(UserWarning, match="cosine zeta schedule ended after total_steps=4"):  # never silently
        assert cosine.at(4) == pytest.approx(0.0) and cosine.at(9) == cosine.at(4)
    for bad in (dict(zeta=1.5), dict(kind="linear"), dict(kind="cosine")):
        with pytest.raises(ValueError):
            ZetaSchedule(**{"zeta": 0.3, **bad})


def test_a_rewire_schedule_counts_optimizer_steps_like_rigl():
    schedule = RewireSchedule(every=100, until=350)
    assert [s for s in range(0, 1000) if schedule.due(s)] == [100, 200, 300]
    assert schedule.count(1000) == 3 and RewireSchedule(every=100).count(1000) == 10
    assert RewireSchedule(every=100).count(99) == 0
    for bad in (dict(every=0), dict(every=1.5), dict(every=10, until=0)):
        with pytest.raises(ValueError):
            RewireSchedule(**bad)


def test_the_plan_lands_on_the_target_and_pauses_do_not_advance_it():
    plan = CompressionPlan([1000, 500], [100, 50], start_step=1, end_step=3)
    assert plan.targets(0) is None
    seen = []
    for _ in range(3):
        seen.append(plan.targets(1))
        plan.advance()
    assert seen[-1] == [100, 50] and seen[0][0] > seen[1][0] > seen[2][0]
    restored = CompressionPlan([1, 1], [1, 1], 1, 3)
    restored.load_state_dict(plan.state_dict())
    assert restored.targets(5) == plan.targets(5) == [100, 50]
    with pytest.raises(ValueError, match="compress_start_step <= compress_end_step"):
        CompressionPlan([10], [5], start_step=3, end_step=1)


def test_the_rewirer_takes_step_names_and_their_older_spelling():
    model = SparseMLP([10, 12, 4], epsilon=2, seed=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    a = Rewirer(model, optimizer, compress_to=0.2, compress_start_step=1, compress_end_step=2)
    b = Rewirer(model, optimizer, compress_to=0.2, compress_start=1, compress_end=2)
    assert (a.compress_start, a.compress_end) == (b.compress_start, b.compress_end) == (1, 2)
    with pytest.raises(ValueError, match="not both"):
        Rewirer(model, optimizer, compress_to=0.2, compress_end_step=2, compress_end=3)
