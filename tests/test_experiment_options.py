"""The options issue 16's experiments need: a wiring seed apart from the seed, input scaling, new
weights and a grace period from the config, and model selection on validation."""

import pytest
import torch

from synthprune import Rewirer, SparseMLP, sparse_layers
from synthprune.config import load_config
from synthprune.data import scale_inputs
from synthprune.runs import build_model, summarize
from synthprune.train import build_rewirer


def test_a_wiring_seed_fixes_the_start_network_and_the_seed_the_rest():
    a = build_model(load_config("digits-mlp", seed=1, wiring_seed=7), 64, 10)
    b = build_model(load_config("digits-mlp", seed=2, wiring_seed=7), 64, 10)
    c = build_model(load_config("digits-mlp", seed=7), 64, 10)
    for (name, x), y, z in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values(), strict=True):
        assert torch.equal(x, y) and torch.equal(x, z), name  # same start as each other and as seed 7
    rewirers = [build_rewirer(load_config("digits-mlp", seed=s, wiring_seed=7), m, None, 1437)
                for s, m in ((1, a), (2, b))]
    assert rewirers[0].seed == 1 and rewirers[1].seed == 2  # rewiring draws follow the seed


def test_input_scalings():
    x_train = torch.rand(500, 6)
    x_train[:, 0] = 0.0  # an always-black pixel
    x_test = torch.rand(50, 6)
    unit = scale_inputs(x_train, x_test, "unit")
    assert unit[0] is x_train and unit[1] is x_test
    glob, _ = scale_inputs(x_train, x_test, "global")
    assert abs(float(glob.mean())) < 1e-5 and float(glob[:, 0].abs().min()) > 0.5  # black is a non-zero constant
    pixel, _ = scale_inputs(x_train, x_test, "pixel")
    assert torch.allclose(pixel.mean(0), torch.zeros(6), atol=1e-5)
    assert (pixel[:, 0] == 0).all()  # a constant pixel becomes 0: its weights learn nothing
    with pytest.raises(ValueError, match="unknown input scaling"):
        scale_inputs(x_train, x_test, "minmax")


@pytest.mark.parametrize("grace", [1, 2])
def test_a_grace_period_keeps_new_connections_for_that_many_steps(grace):
    model = SparseMLP([30, 40, 5], epsilon=4, seed=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    rewirer = Rewirer(model, optimizer, grow="random", prune="magnitude", zeta=0.6, grace_steps=grace, seed=0,
                      new_weights="zero")
    (_, layer), = sparse_layers(model)
    born: dict[int, int] = {}
    count = layer.nnz
    for step in range(6):
        before = set(layer.keys().tolist())
        rewirer.step()
        after = set(layer.keys().tolist())
        for key in before - after:  # pruned at this step: never younger than the grace period allows
            assert step - born.get(key, -100) > grace, (key, born.get(key), step)
        born |= {key: step for key in after - before}
        assert layer.nnz == count  # the count stays exact
    state = rewirer.state_dict()
    fresh = Rewirer(model, optimizer, grow="random", prune="magnitude", zeta=0.6, grace_steps=grace, seed=0)
    fresh.load_state_dict(state)  # the birth steps travel with the state: a resume protects the same
    assert all(torch.equal(a, b) for a, b in zip(fresh._born, rewirer._born, strict=True))


def test_new_weights_and_grace_reach_the_rewirer_from_the_config():
    config = load_config("digits-mlp", new_weights="normal", new_weight_std=0.05, grace_steps=2)
    rewirer = build_rewirer(config, build_model(config, 64, 10), None, 1437)
    assert (rewirer.new_weights, rewirer.new_weight_std, rewirer.grace_steps) == ("normal", 0.05, 2)


def epochs(*rows: tuple[float, float, int]) -> list[dict]:
    """Metrics rows from (test accuracy, validation accuracy, connections) per epoch."""
    return [{"epoch": e, "test_accuracy": test, "validation_accuracy": val, "connections": n, "epoch_seconds": 1}
            for e, (test, val, n) in enumerate(rows, start=1)]


def test_the_model_is_chosen_on_validation_never_on_test():
    metrics = epochs((0.80, 0.70, 10), (0.90, 0.60, 10), (0.85, 0.70, 10))
    summary = summarize(metrics, SparseMLP([4, 3, 2], epsilon=1, seed=0))
    assert summary["best_validation_epoch"] == 1 and summary["test_accuracy_at_best_validation"] == 0.80
    assert summary["best_test_accuracy"] == 0.90  # still reported, but not what a model is chosen by


def test_a_compressing_run_is_chosen_at_its_budget():
    # Bug: gradual pruning from dense was "chosen" at a validation peak with 20x its budget.
    metrics = epochs((0.89, 0.90, 800), (0.86, 0.85, 40), (0.87, 0.86, 40))
    summary = summarize(metrics, SparseMLP([4, 3, 2], epsilon=1, seed=0))
    assert summary["best_validation_epoch"] == 3 and summary["test_accuracy_at_best_validation"] == 0.87


def test_gradual_magnitude_pruning_starts_from_every_connection():
    config = load_config("digits-mlp", density=1.0, grow="none", prune="magnitude", compress_to=0.05,
                         backend="masked", epochs=4)
    model = build_model(config, 64, 10)
    layers = sparse_layers(model)
    assert [layer.density for _, layer in layers] == [1.0, 1.0]  # sparse layers holding every connection
    rewirer = build_rewirer(config, model, torch.optim.SGD(model.parameters(), lr=0.1), 1437)
    for _ in range(3):
        rewirer.step()
    assert sum(layer.nnz for _, layer in layers) == round(0.05 * (64 * 128 + 128 * 128))
    plain = build_model(load_config("digits-mlp", density=1.0), 64, 10)
    assert not sparse_layers(plain)  # without compression a full layer is simply dense
