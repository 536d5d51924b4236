"""The Rewirer: invariants across every strategy x backend, agreement, state, errors."""

from itertools import pairwise

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from helpers import make_optimizer, snapshot, train_steps
from synthprune import Rewirer, SparseLinear, SparseMLP, list_strategies, sparse_layers
from synthprune.strategies import grow_options

GROW = list_strategies()["grow"]
PRUNE = list_strategies()["prune"]




@pytest.mark.parametrize("backend", ["csr", "masked"])
@pytest.mark.parametrize("grow", GROW)
@given(
    prune=st.sampled_from(PRUNE),
    sizes=st.lists(st.integers(2, 30), min_size=3, max_size=3), density=st.floats(0.05, 1.0),
    zeta=st.floats(0.01, 0.99), optimizer_kind=st.sampled_from(["sgd", "adam"]), seed=st.integers(0, 1000),
)
def test_invariants_hold_after_every_step(backend, grow, prune, sizes, density, zeta, optimizer_kind, seed):
    # SparseLinear directly (not SparseMLP), so that even a full layer stays a sparse layer
    g = torch.Generator().manual_seed(seed)
    counts = [max(1, round(density * a * b)) for a, b in pairwise(sizes)]
    model = torch.nn.Sequential(
        SparseLinear(sizes[0], sizes[1], connections=counts[0], backend=backend, generator=g),
        torch.nn.ReLU(),
        SparseLinear(sizes[1], sizes[2], connections=counts[1], backend=backend, generator=g),
    )
    optimizer = make_optimizer(optimizer_kind, model)
    options = {"endpoint": "tail"} if grow == "synthesis" and seed % 2 else {}
    rewirer = Rewirer(model, optimizer, prune=prune, grow=grow, zeta=zeta, seed=seed, **options)
    layers = sparse_layers(model)
    budget = [layer.nnz for _, layer in layers]
    for step in range(3):
        batch = train_steps(model, optimizer, 2, seed + step, sizes[0], sizes[-1])
        before = [snapshot(layer, optimizer) for _, layer in layers]
        reports = rewirer.step(batch=batch)
        for (name, layer), report, count, old in zip(layers, reports, budget, before, strict=True):
            layer.check()  # sorted, unique, in range; masked: zero off the mask
            assert layer.nnz == count == report.connections  # exact budget
            expected = 0 if grow == "none" else round(zeta * count)
            assert report.pruned == report.grown == expected
            assert 0 <= report.fallbacks <= report.grown
            param = layer.connection_parameter()
            assert param.grad is None
            states = {k: v for k, v in optimizer.state[param].items() if torch.is_tensor(v) and v.numel() > 1}
            for state in states.values():
                assert state.shape == param.shape  # csr: one entry per connection, no more
                if backend == "masked":
                    assert (state[~layer.mask] == 0).all(), "optimizer state at an absent connection"
            new = snapshot(layer, optimizer)
            grown = 0
            for key, (value, state) in new.items():
                if old.get(key) == (value, state):
                    continue  # a survivor: value and optimizer state carried over unchanged
                grown += 1  # a new connection: weight 0, optimizer state 0
                assert value == 0 and all(v == 0 for v in state.values()), f"{name} key {key}"
            assert grown <= report.grown


@pytest.mark.parametrize("grow", ["random", "synthesis", "gradient"])
def test_backends_give_the_same_topology(grow):
    models = {b: SparseMLP([30, 40, 40, 5], epsilon=4, backend=b, seed=3).double() for b in ("csr", "masked")}
    optimizers = {b: make_optimizer("sgd", m) for b, m in models.items()}
    rewirers = {b: Rewirer(m, optimizers[b], grow=grow, seed=7) for b, m in models.items()}
    for step in range(3):
        for b in models:
            batch = train_steps(models[b], optimizers[b], 3, step, 30, 5)
            reports = rewirers[b].step(batch=batch)
            assert sum(r.grown for r in reports) > 0
        (_, csr_layers), (_, masked_layers) = [(b, sparse_layers(m)) for b, m in models.items()]
        for (_, c), (_, m) in zip(csr_layers, masked_layers, strict=True):
            assert torch.equal(c.keys(), m.keys())
            torch.testing.assert_close(c.connection_values(), m.connection_values(), atol=1e-5, rtol=1e-5)


def test_state_dict_round_trip_continues_identically(backend, tmp_path):
    def build():
        model = SparseMLP([20, 24, 24, 4], epsilon=3, backend=backend, seed=0)
        optimizer = make_optimizer("sgd", model)
        return model, optimizer, Rewirer(model, optimizer, grow="synthesis", seed=11)

    model, optimizer, rewirer = build()
    train_steps(model, optimizer, 2, 0, 20, 4)
    rewirer.step()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "rewirer": rewirer.state_dict()},
               tmp_path / "ckpt.pt")
    train_steps(model, optimizer, 2, 1, 20, 4)
    rewirer.step()

    clone, clone_opt, clone_rewirer = build()
    checkpoint = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    clone.load_state_dict(checkpoint["model"])
    clone_opt.load_state_dict(checkpoint["optimizer"])
    clone_rewirer.load_state_dict(checkpoint["rewirer"])
    train_steps(clone, clone_opt, 2, 1, 20, 4)
    clone_rewirer.step()
    for (_, a), (_, b) in zip(sparse_layers(model), sparse_layers(clone), strict=True):
        assert torch.equal(a.keys(), b.keys())
        torch.testing.assert_close(a.connection_values(), b.connection_values())


def test_load_state_dict_refuses_other_settings():
    model = SparseMLP([8, 8, 2], epsilon=1, seed=0)
    saved = Rewirer(model, None, grow="random").state_dict()
    with pytest.raises(ValueError, match="other settings"):
        Rewirer(model, None, grow="synthesis").load_state_dict(saved)


def test_training_continues_after_rewiring(backend):
    model = SparseMLP([20, 32, 4], epsilon=3, backend=backend, seed=0)
    optimizer = make_optimizer("adam", model)
    rewirer = Rewirer(model, optimizer, grow="synthesis")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 20, generator=g)
    y = (x[:, :4]).argmax(1)  # a learnable rule
    losses = []
    for _epoch in range(6):
        for _ in range(20):
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
        losses.append(loss.item())
        rewirer.step()
    assert losses[-1] < 0.5 * losses[0]


def test_cosine_schedule_decays_to_zero():
    model = SparseMLP([10, 10, 2], epsilon=2, seed=0)
    rewirer = Rewirer(model, None, grow="random", zeta=0.4, zeta_schedule="cosine", total_steps=4)
    zetas = [rewirer.step()[0].zeta for _ in range(4)]
    with pytest.warns(UserWarning, match="cosine zeta schedule ended"):  # a fifth step: said, not silent
        zetas.append(rewirer.step()[0].zeta)
    assert zetas == pytest.approx([0.4, 0.4 * (1 + 2**-0.5) / 2, 0.2, 0.4 * (1 - 2**-0.5) / 2, 0.0])


def test_static_sparse_never_changes():
    model = SparseMLP([10, 10, 2], epsilon=2, seed=0)
    keys = model.fc1.keys().clone()
    Rewirer(model, None, grow="none").step()
    assert torch.equal(model.fc1.keys(), keys)


def test_new_weights_normal_option():
    model = SparseMLP([40, 40, 2], epsilon=4, seed=0)
    with torch.no_grad():
        model.fc1.values.fill_(1.0)
    Rewirer(model, None, grow="random", new_weights="normal", new_weight_std=0.01, prune="magnitude").step()
    new = model.fc1.values[model.fc1.values != 1.0]
    assert new.numel() == round(0.3 * model.fc1.nnz) and 0 < new.abs().max() < 0.1


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"grow": "fancy"}, r"unknown grow strategy 'fancy'; valid: gradient, none, random, synthesis"),
        ({"prune": "fancy"}, r"unknown prune criterion 'fancy'; valid: magnitude, set"),
        ({"zeta": 0.0}, r"zeta must be in \(0, 1\), got 0.0"),
        ({"zeta": 1.0}, r"zeta must be in \(0, 1\), got 1.0"),
        ({"zeta_schedule": "linear"}, r"unknown zeta_schedule 'linear'; valid: constant, cosine"),
        ({"zeta_schedule": "cosine"}, r"needs total_steps"),
        ({"grow": "synthesis", "endpoint": "x"}, r"unknown endpoint 'x'; valid: cdf, tail"),
        ({"grow": "random", "endpoint": "tail"}, r"unknown option\(s\) \['endpoint'\] for grow='random'"),
        ({"new_weights": "ones"}, r"unknown new_weights 'ones'; valid: zero, normal"),
    ],
)
def test_bad_settings_raise_value_error(kwargs, message):
    model = SparseMLP([10, 10, 2], epsilon=2, seed=0)
    with pytest.raises(ValueError, match=message):
        Rewirer(model, None, **kwargs).step()


def test_gradient_growth_needs_a_batch():
    model = SparseMLP([10, 10, 2], epsilon=2, seed=0)
    with pytest.raises(ValueError, match="needs a batch"):
        Rewirer(model, None, grow="gradient").step()


def test_model_without_sparse_layers_is_refused():
    with pytest.raises(ValueError, match="no sparse layers"):
        Rewirer(torch.nn.Linear(3, 3))


def test_synthesis_options_are_listed():
    assert grow_options("synthesis") == {"endpoint": "cdf", "kappa_start": 0.0, "kappa_end": 1.0}
