"""Strategic synthesis does what it says: growth starts at strong nodes and ends at strong
endpoints far more often than random growth (statistical tests, fixed seeds)."""

import pytest
import torch
from scipy.stats import fisher_exact

from synthprune.strategies import GrowContext, get_grow, output_strength
from synthprune.topology import place_growth, random_keys, zscore

N = 200
PLANTED = 10  # strong input nodes 0..9 and strong output nodes 0..9
GROW = 1000


def planted_layer(seed=0) -> GrowContext:
    """A 200x200 layer at 5% density where every connection touching a planted node weighs
    1.0 and every other one 0.05 (random signs)."""
    g = torch.Generator().manual_seed(seed)
    keys = random_keys(N * N, 2000, g)
    rows, cols = keys // N, keys % N
    strong = (rows < PLANTED) | (cols < PLANTED)
    signs = torch.randint(0, 2, keys.shape, generator=g) * 2 - 1
    values = torch.where(strong, 1.0, 0.05) * signs
    return GrowContext(N, N, keys, values)


def grow(name, ctx, seed=1, **options):
    new, fallbacks = place_growth(ctx.keys, N * N, GROW, get_grow(name)(ctx, GROW, **options),
                                  torch.Generator().manual_seed(seed))
    assert fallbacks == 0
    return new // N, new % N  # (endpoints, starts)


def significantly_more(hits_a, hits_b, n=GROW):
    """One-sided Fisher exact test: does a hit planted nodes more often than b?"""
    return fisher_exact([[hits_a, n - hits_a], [hits_b, n - hits_b]], alternative="greater").pvalue


@pytest.mark.parametrize("endpoint", ["cdf", "tail"])
def test_synthesis_starts_at_strong_nodes_and_ends_at_strong_endpoints(endpoint):
    ctx = planted_layer()
    ends_r, starts_r = grow("random", ctx)
    ends_s, starts_s = grow("synthesis", ctx, endpoint=endpoint)
    start_hits_r, start_hits_s = int((starts_r < PLANTED).sum()), int((starts_s < PLANTED).sum())
    end_hits_r, end_hits_s = int((ends_r < PLANTED).sum()), int((ends_s < PLANTED).sum())
    # random: ≈ 5% of starts and of endpoints at the planted nodes
    assert start_hits_r < 0.1 * GROW and end_hits_r < 0.1 * GROW
    # synthesis: several times as many starts at the planted nodes, endpoints significantly more
    assert start_hits_s > 3 * start_hits_r
    assert significantly_more(start_hits_s, start_hits_r) < 1e-12
    assert significantly_more(end_hits_s, end_hits_r) < 1e-6
    if endpoint == "tail":  # the tail concentrates endpoints far more than the CDF weighting
        assert end_hits_s > 5 * end_hits_r


def test_weak_endpoints_stay_possible_with_cdf():
    ends, _ = grow("synthesis", planted_layer(), endpoint="cdf")
    assert (ends >= PLANTED).sum() > 0.3 * GROW


def test_tail_relaxes_kappa_when_the_tail_is_full():
    ctx = planted_layer()
    # ask for more connections than the planted block (≤ 10 starts x 10 ends... plus) can hold
    count = 3000
    new, fallbacks = place_growth(ctx.keys, N * N, count, get_grow("synthesis")(ctx, count, endpoint="tail"),
                                  torch.Generator().manual_seed(0))
    assert new.unique().numel() == count and fallbacks < count


def test_all_zero_weights_fall_back_to_uniform_starts():
    ctx = planted_layer()
    ctx = GrowContext(N, N, ctx.keys, torch.zeros_like(ctx.values))
    _, starts = grow("synthesis", ctx)
    assert starts.unique().numel() > 150  # spread over nearly all inputs


def test_tail_endpoints_stay_in_the_tail_while_it_has_room():
    ctx = planted_layer()
    tail = zscore(output_strength(ctx)) >= 1.0  # the planted outputs and a few they feed strongly
    assert tail[:PLANTED].all() and tail.sum() < 20
    count = 50
    new, _ = place_growth(ctx.keys, N * N, count, get_grow("synthesis")(ctx, count, endpoint="tail"),
                          torch.Generator().manual_seed(0))
    assert tail[new // N].all()
