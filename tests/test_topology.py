"""The pure topology primitives: counts, sampling, the shared selection, invariant checks."""

import math
import subprocess
import sys

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from synthprune.strategies import set_scores
from synthprune.topology import (
    TopologyError,
    check_topology,
    contains,
    er_count,
    erk_counts,
    multinomial_with_replacement,
    place_growth,
    random_keys,
    sample_free,
    select_lowest,
    top_gradient_slots,
    unique_in_order,
)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_er_count_exact_and_capped():
    assert er_count(784, 1000, 20) == 20 * 1784
    assert er_count(1000, 10, 20) == 10_000  # 20 * 1010 > 10_000: the output layer is dense
    assert er_count(3, 3, 1e-6) == 1  # never an empty layer


@pytest.mark.parametrize("epsilon", [0, -1.0])
def test_er_count_rejects_bad_epsilon(epsilon):
    with pytest.raises(ValueError, match="epsilon must be > 0"):
        er_count(10, 10, epsilon)


def test_erk_counts_hit_global_density_and_cap_dense_layers():
    shapes = [(784, 1000), (1000, 1000), (1000, 1000), (1000, 10)]
    counts = erk_counts(shapes, 0.05)
    total = sum(a * b for a, b in shapes)
    assert abs(sum(counts) - 0.05 * total) <= len(shapes)
    assert counts[-1] == 10_000  # the small output layer saturates and becomes dense
    # ERK: density ∝ (n_in + n_out) / (n_in n_out) among the sparse layers
    d0, d1 = counts[0] / 784_000, counts[1] / 1_000_000
    assert d0 / d1 == pytest.approx((1784 / 784_000) / (2000 / 1_000_000), rel=1e-3)


@given(n_slots=st.integers(1, 5000), frac=st.floats(0.0, 1.0), seed=st.integers(0, 2**31))
def test_random_keys_exact_distinct_sorted(n_slots, frac, seed):
    count = int(frac * n_slots)
    keys = random_keys(n_slots, count, gen(seed))
    check_topology(keys, 1, n_slots, expected_count=count)


@given(n_slots=st.integers(1, 3000), existing_frac=st.floats(0, 1), grow_frac=st.floats(0, 1),
       seed=st.integers(0, 2**31))
def test_sample_free_avoids_existing(n_slots, existing_frac, grow_frac, seed):
    existing = random_keys(n_slots, int(existing_frac * n_slots), gen(seed))
    count = int(grow_frac * (n_slots - existing.numel()))
    new = sample_free(existing, n_slots, count, gen(seed + 1))
    assert new.numel() == count == new.unique().numel()
    assert not contains(existing, new).any()
    assert new.numel() == 0 or (new.min() >= 0 and new.max() < n_slots)


def test_a_full_layer_is_drawn_without_collecting_coupons():
    # Bug: a layer created full (density 1, gradual magnitude pruning from dense) drew its
    # 784,000 keys by rejection sampling, whose last keys took tens of minutes: the run never
    # started. A real process, so that the old behaviour fails by the timeout instead of hanging.
    script = ("import torch; from synthprune.topology import random_keys; "
              "k = random_keys(784_000, 784_000, torch.Generator().manual_seed(0)); "
              "assert torch.equal(k, torch.arange(784_000)); "
              "k = random_keys(784_000, 700_000, torch.Generator().manual_seed(0)); "
              "assert k.unique().numel() == 700_000")
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)


def test_sample_free_refuses_more_than_free():
    with pytest.raises(ValueError, match="free slots"):
        sample_free(torch.arange(8), 10, 3, gen())


def test_sample_free_is_uniform():
    # 60 free of 100 slots, 30 draws, many repetitions: every free slot hit ≈ equally often
    existing = torch.arange(0, 100, 5).repeat_interleave(1)  # 20 taken
    existing = torch.cat([existing, torch.arange(1, 100, 5)]).sort().values  # 40 taken
    hits = torch.zeros(100)
    g = gen()
    for _ in range(400):
        hits[sample_free(existing, 100, 30, g)] += 1
    free_hits = hits[~contains(existing, torch.arange(100))]
    assert hits[existing].sum() == 0
    expected = 400 * 30 / 60
    assert ((free_hits - expected).abs() < 5 * math.sqrt(expected)).all()


def test_unique_in_order_keeps_first_occurrence_order():
    assert unique_in_order(torch.tensor([5, 3, 5, 1, 3, 9])).tolist() == [5, 3, 1, 9]


def test_select_lowest_is_stable():
    scores = torch.tensor([0.5, 0.1, 0.1, 0.9, 0.1])
    assert select_lowest(scores, 2).tolist() == [1, 2]
    with pytest.raises(ValueError):
        select_lowest(scores, 6)


def test_place_growth_uses_proposals_then_falls_back():
    existing = torch.tensor([0, 1, 2, 3])
    useful = lambda n, g: torch.tensor([7, 7, 2, 9, 8] * n)[:n]  # repeats and an existing key
    new, fallbacks = place_growth(existing, 20, 3, useful, gen())
    assert new.tolist() == [7, 9, 8] and fallbacks == 0
    stuck = lambda n, g: torch.tensor([1] * n)  # only ever proposes an existing connection
    new, fallbacks = place_growth(existing, 20, 5, stuck, gen())
    assert fallbacks == 5 and new.unique().numel() == 5 and not contains(existing, new).any()


def test_place_growth_rejects_out_of_range_proposals():
    with pytest.raises(TopologyError, match="outside"):
        place_growth(torch.tensor([0]), 10, 2, lambda n, g: torch.full((n,), 10), gen())


@given(n_in=st.integers(1, 30), n_out=st.integers(1, 30), batch=st.integers(1, 8),
       frac=st.floats(0, 0.9), chunk=st.integers(1, 200), seed=st.integers(0, 1000))
def test_top_gradient_slots_matches_dense_reference(n_in, n_out, batch, frac, chunk, seed):
    g = gen(seed)
    x, gy = torch.randn(batch, n_in, generator=g), torch.randn(batch, n_out, generator=g)
    existing = random_keys(n_in * n_out, int(frac * n_in * n_out), g)
    count = (n_in * n_out - existing.numel()) // 2
    got = top_gradient_slots(x, gy, existing, count, max_chunk_elements=chunk)
    scores = (gy.t() @ x).abs().reshape(-1)
    scores[existing] = -1
    expected = torch.topk(scores, count).values
    assert not contains(existing, got).any() and got.unique().numel() == count
    torch.testing.assert_close(scores[got], expected)  # same scores (ties may swap keys)


@pytest.mark.parametrize(
    "keys, message",
    [(torch.tensor([3, 1]), "sorted"), (torch.tensor([1, 1]), "duplicates"),
     (torch.tensor([0, 100]), "out of range"), (torch.tensor([1.0]), "int64")],
)
def test_check_topology_catches_broken_topologies(keys, message):
    with pytest.raises(TopologyError, match=message):
        check_topology(keys, 10, 10)
    with pytest.raises(TopologyError, match="expected 3"):
        check_topology(torch.tensor([1, 2]), 10, 10, expected_count=3)


def test_set_scores_prune_equal_fractions_of_each_sign_and_zeros_first():
    values = torch.cat([torch.linspace(0.1, 1, 60), -torch.linspace(0.1, 1, 40), torch.zeros(2)])
    pruned = select_lowest(set_scores(values), 32)
    removed = values[pruned]
    assert (removed == 0).sum() == 2
    assert (removed > 0).sum() == 18 and (removed < 0).sum() == 12  # 30% of 60 and of 40
    assert removed[removed > 0].max() < values[values > 0].sort().values[18]  # the smallest positives
    assert removed[removed < 0].min() > values[values < 0].sort(descending=True).values[12]  # closest to 0


@given(scores=st.lists(st.integers(0, 5), min_size=1, max_size=60), data=st.data())
def test_select_lowest_equals_a_stable_sort(scores, data):
    # select_lowest avoids a full sort (kthvalue); it must pick what a stable sort picks.
    values = torch.tensor(scores, dtype=torch.float32)  # small integers: many ties
    protected = torch.tensor(data.draw(st.lists(st.booleans(), min_size=len(scores), max_size=len(scores))))
    free = (~protected).nonzero().squeeze(1)
    k = data.draw(st.integers(0, free.numel()))
    expected = free[torch.sort(values[free], stable=True).indices[:k]]
    assert select_lowest(values, k, protected).tolist() == expected.tolist()
    assert select_lowest(values, min(k, len(scores)), None).tolist() == \
        torch.sort(values, stable=True).indices[: min(k, len(scores))].tolist()


@given(st.lists(st.integers(0, 20), max_size=80))
def test_unique_in_order_keeps_first_occurrences(values):
    expected = list(dict.fromkeys(values))
    assert unique_in_order(torch.tensor(values, dtype=torch.long)).tolist() == expected


def per_sign_set_scores(values):
    """The SET criterion as first written (one stable sort per sign): the specification."""
    scores = torch.full_like(values, -1.0)
    for sign_mask, magnitude in ((values > 0, values), (values < 0, -values)):
        n = int(sign_mask.sum())
        if n:
            ranks = torch.empty(n, dtype=values.dtype)
            ranks[torch.sort(magnitude[sign_mask], stable=True).indices] = torch.arange(n, dtype=values.dtype)
            scores[sign_mask] = (ranks + 0.5) / n
    return scores


@given(data=st.lists(st.sampled_from([0.0, -0.0, 0.5, -0.5, 1e-30, -1e-30, 3.0, -3.0, 1e30]) | st.floats(-4, 4),
                     max_size=200),
       dtype=st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]))
def test_set_scores_match_the_per_sign_specification_including_ties(data, dtype):
    values = torch.tensor(data, dtype=torch.float64).to(dtype)  # repeats: many exact ties
    assert torch.equal(set_scores(values), per_sign_set_scores(values))


@given(weights=st.lists(st.floats(0, 1000) | st.just(0.0), min_size=1, max_size=300), n=st.integers(1, 3000),
       seed=st.integers(0, 2**31))
def test_multinomial_with_replacement_is_torch_multinomial_draw_for_draw(weights, n, seed):
    weights = torch.tensor(weights, dtype=torch.float32)
    if not weights.sum() > 0:
        weights[0] = 1.0
    ours, theirs = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    expected = torch.multinomial(weights, n, replacement=True, generator=theirs)
    assert torch.equal(multinomial_with_replacement(weights, n, ours), expected)
    assert torch.equal(ours.get_state(), theirs.get_state())  # the next draws agree too
