"""Compression (DESIGN §2.4): targets, the cubic schedule, exact counts, protected inputs."""

from itertools import pairwise

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from helpers import make_optimizer, snapshot, train_steps
from synthprune import Rewirer, SparseLinear, SparseMLP, list_strategies, sparse_layers
from synthprune.compression import LayerShape, final_counts, parse_target
from synthprune.schedules import cubic_count

GROW = list_strategies()["grow"]


# Several tests rewire without an optimizer on purpose (wiring only); the warning is tested elsewhere.
pytestmark = pytest.mark.filterwarnings("ignore:Rewirer without the optimizer")


@given(initial=st.integers(1, 10**6), share=st.floats(0, 1), total=st.integers(1, 50))
def test_cubic_count_starts_at_initial_shrinks_monotonically_and_ends_exactly(initial, share, total):
    final = round(share * initial)
    counts = [cubic_count(initial, final, done, total) for done in range(total + 3)]
    assert counts[0] == initial
    assert all(a >= b for a, b in pairwise(counts))
    assert counts[total:] == [final] * 3
    assert all(c >= final for c in counts)


def test_cubic_count_front_loads_the_shrinking():
    counts = [cubic_count(1000, 0, done, 4) for done in range(5)]
    assert counts == [1000, 422, 125, 16, 0]  # 1000·(1 - t/4)³, rounded up


SHAPES = [LayerShape("fc1", 784, 1000, 35_680), LayerShape("fc2", 1000, 1000, 40_000),
          LayerShape("fc3", 1000, 1000, 40_000)]


def test_parse_target_reads_densities_and_counts():
    assert parse_target("0.01") == 0.01
    assert parse_target(5000) == 5000 and isinstance(parse_target("5000.0"), int)
    for bad in ("abc", 0, -3, 12.5, float("nan")):
        with pytest.raises(ValueError, match="compress_to"):
            parse_target(bad)


def test_final_counts_per_layer_and_global():
    assert final_counts(SHAPES, 0.01, "layer") == [7840, 10_000, 10_000]
    assert final_counts(SHAPES, 3000, "layer") == [3000, 3000, 3000]
    total = round(0.01 * (784_000 + 2_000_000))
    shares = final_counts(SHAPES, 0.01, "global")
    assert sum(shares) == total  # exact, after rounding
    # in proportion to the current counts (the Erdős–Rényi shape is kept)
    assert abs(shares[1] - shares[2]) <= 1 and abs(shares[0] / shares[1] - 35_680 / 40_000) < 1e-3
    assert final_counts(SHAPES, {"fc2": 0.005}) == [35_680, 5000, 40_000]


def test_global_share_respects_one_input_per_output_neuron():
    shapes = [LayerShape("a", 100, 10, 900), LayerShape("b", 100, 500, 600)]
    shares = final_counts(shapes, 600, "global")
    assert sum(shares) == 600 and shares[1] >= 500 and shares[0] >= 10


@pytest.mark.parametrize(("target", "scope", "message"), [
    (0.05, "layer", "more than the 35,680 it starts with"),
    (500, "layer", "fewer than its 1,000 output neurons"),
    (200_000, "global", "compression only shrinks"),
    (2999, "global", "fewer than their 3,000 output neurons"),
    ({"fc9": 0.01}, "layer", "unknown layer"),
    (0.01, "everywhere", "unknown compress scope"),
])
def test_infeasible_targets_are_refused(target, scope, message):
    with pytest.raises(ValueError, match=message):
        final_counts(SHAPES, target, scope)


def test_rewirer_refuses_an_infeasible_target_before_any_step():
    model = SparseMLP([20, 30, 30, 4], epsilon=2, seed=0)
    with pytest.raises(ValueError, match="output neurons"):
        Rewirer(model, None, compress_to=10, compress_scope="layer", compress_end=3)
    with pytest.raises(ValueError, match="compress_end"):
        Rewirer(model, None, compress_to=0.05)


def in_degree(layer):
    return torch.bincount(layer.edge_index()[0], minlength=layer.out_features)


def _two_layer(backend, sizes, counts, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.Sequential(
        SparseLinear(sizes[0], sizes[1], connections=counts[0], backend=backend, generator=g),
        torch.nn.ReLU(),
        SparseLinear(sizes[1], sizes[2], connections=counts[1], backend=backend, generator=g),
    )


@pytest.mark.parametrize("backend", ["csr", "masked"])
@pytest.mark.parametrize("grow", GROW)
@given(
    sizes=st.lists(st.integers(2, 25), min_size=3, max_size=3), density=st.floats(0.1, 1.0),
    shrink=st.floats(0, 1), scope=st.sampled_from(["layer", "global"]), zeta=st.floats(0.01, 0.9),
    start=st.integers(0, 1), length=st.integers(1, 3), optimizer_kind=st.sampled_from(["sgd", "adam"]),
    seed=st.integers(0, 1000),
)
def test_compression_reaches_its_targets_exactly(backend, grow, sizes, density, shrink, scope, zeta, start, length,
                                                 optimizer_kind, seed):
    counts = [max(b, round(density * a * b)) for a, b in pairwise(sizes)]  # at least one per output neuron
    model = _two_layer(backend, sizes, counts, seed)
    optimizer = make_optimizer(optimizer_kind, model)
    outs = sizes[1:]
    if scope == "layer":
        compress_to = {f"{i}": n + int(shrink * (c - n)) for i, n, c in zip((0, 2), outs, counts, strict=True)}
    else:
        compress_to = sum(outs) + int(shrink * (sum(counts) - sum(outs)))
    end = start + length - 1
    rewirer = Rewirer(model, optimizer, grow=grow, zeta=zeta, seed=seed, compress_to=compress_to,
                      compress_scope=scope, compress_start=start, compress_end=end)
    finals = rewirer.final_counts
    if scope == "global":
        assert sum(finals) == compress_to
    layers = sparse_layers(model)
    for step in range(end + 2):
        batch = train_steps(model, optimizer, 2, seed + step, sizes[0], sizes[-1])
        before = [snapshot(layer, optimizer) for _, layer in layers]
        had_inputs = [in_degree(layer) > 0 for _, layer in layers]
        previous = [layer.nnz for _, layer in layers]
        reports = rewirer.step(batch=batch)
        for (_, layer), report, initial, final, count, old in zip(
                layers, reports, rewirer.initial_counts, finals, previous, before, strict=True):
            layer.check()
            done = min(max(0, step - start + 1), length)
            assert layer.nnz == report.connections == cubic_count(initial, final, done, length)
            assert report.pruned - report.grown == count - layer.nnz
            if grow == "none":
                assert report.grown == 0
            assert layer.connection_parameter().grad is None
            for key, (value, state) in snapshot(layer, optimizer).items():
                if old.get(key) != (value, state):  # new connections start at 0 with zero state
                    assert value == 0 and all(v == 0 for v in state.values())
        # A live neuron (a hidden one that feeds the next layer, or an output of the network)
        # never loses its last input.
        live = [torch.bincount(layers[1][1].edge_index()[1], minlength=sizes[1]) > 0,
                torch.ones(sizes[2], dtype=torch.bool)]
        for (_, layer), is_live, had in zip(layers, live, had_inputs, strict=True):
            assert not (is_live & had & (in_degree(layer) == 0)).any()
    assert [layer.nnz for _, layer in layers] == finals


def test_paused_steps_hold_the_count_and_delay_the_schedule():
    model = SparseMLP([20, 30, 30, 4], epsilon=3, seed=0)
    rewirer = Rewirer(model, None, grow="random", compress_to=0.1, compress_scope="layer", compress_end=1)
    counts = lambda: [layer.nnz for _, layer in sparse_layers(model)]
    start = counts()
    rewirer.step(compress=False)
    assert counts() == start
    rewirer.step()
    rewirer.step(compress=False)
    middle = counts()
    assert middle != start and middle != rewirer.final_counts
    rewirer.step()
    assert counts() == rewirer.final_counts


def test_static_compression_prunes_by_magnitude_but_keeps_each_live_neurons_strongest_input():
    model = SparseMLP([20, 30, 30, 4], epsilon=3, seed=0)
    (_, fc1), (_, fc2) = sparse_layers(model)
    weight = {k: abs(v) for k, v in zip(fc1.keys().tolist(), fc1.connection_values().tolist(), strict=True)}
    strongest = {}
    for key, w in weight.items():
        row = key // 20
        if w > weight.get(strongest.get(row, -1), -1):
            strongest[row] = key
    rewirer = Rewirer(model, None, prune="magnitude", grow="none", compress_to={"fc1": 60}, compress_end=0)
    rewirer.step()
    live = (torch.bincount(fc2.edge_index()[1], minlength=30) > 0).tolist()
    protected = {key for row, key in strongest.items() if live[row]}
    kept = set(fc1.keys().tolist())
    assert protected <= kept and len(kept) == 60
    pruned = set(weight) - kept
    assert min(weight[k] for k in kept - protected) >= max(weight[k] for k in pruned)


def test_compression_state_round_trip():
    def build():
        model = SparseMLP([20, 24, 24, 4], epsilon=3, seed=0)
        return model, Rewirer(model, None, grow="synthesis", seed=1, compress_to=0.1, compress_end=3)

    model, rewirer = build()
    rewirer.step()
    state, weights = rewirer.state_dict(), model.state_dict()
    rewirer.step()
    clone, clone_rewirer = build()
    clone.load_state_dict(weights)
    clone_rewirer.load_state_dict(state)
    clone_rewirer.step()
    for (_, a), (_, b) in zip(sparse_layers(model), sparse_layers(clone), strict=True):
        assert torch.equal(a.keys(), b.keys())
    with pytest.raises(ValueError, match="other settings"):
        Rewirer(clone, None, grow="synthesis", seed=1, compress_to=0.09, compress_end=3).load_state_dict(state)


def test_training_goes_on_after_shrinking_while_the_last_graph_is_alive(backend):
    # Regression: with `.data = smaller`, a loss still referenced by the training loop kept a
    # stale gradient accumulator and the next backward failed with a shape mismatch.
    model = SparseMLP([20, 30, 30, 4], epsilon=3, backend=backend, seed=0)
    optimizer = make_optimizer("sgd", model)
    rewirer = Rewirer(model, optimizer, grow="random", compress_to=0.1, compress_end=1)
    x, y = torch.randn(8, 20), torch.randint(0, 4, (8,))
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(model(x), y)  # stays alive across the step
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        rewirer.step()
    assert [layer.nnz for _, layer in sparse_layers(model)] == rewirer.final_counts
