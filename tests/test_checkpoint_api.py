"""Checkpoints from Python: save_checkpoint/load_checkpoint resume a user's loop bit for bit
(model, optimizer, rewirer, random states), and a rewirer state that does not belong to the
model's wiring is refused instead of regrowing it."""

import random
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import synthprune
from synthprune.files import FileFormatError


def _build(kind: str):
    if kind == "mlp":
        model = synthprune.SparseMLP([16, 24, 24, 3], epsilon=3, dropout=0.2, seed=0)
    else:
        model = synthprune.sparsify(nn.Sequential(
            nn.Unflatten(1, (1, 4, 4)), nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(96, 3)),
            density=0.4, seed=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    rewirer = synthprune.Rewirer(model, optimizer, grow="gradient", compress_to=0.1, compress_end_step=3, seed=0,
                                 schedule=synthprune.RewireSchedule(every=4))
    return model, optimizer, rewirer


def _train(model, optimizer, rewirer, steps: range, x, y) -> None:
    for step in steps:
        index = torch.randperm(len(y))[:8]  # the global RNG: restored by load_checkpoint
        noise = float(np.random.rand()) * 1e-3 + random.random() * 1e-3  # NumPy and Python RNGs too
        optimizer.zero_grad()
        F.cross_entropy(model(x[index] + noise), y[index]).backward()
        optimizer.step()
        rewirer.maybe_step(step, batch=(x[:16], y[:16]))


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_a_resumed_loop_is_bit_identical(kind, tmp_path):
    data = torch.Generator().manual_seed(3)
    x, y = torch.randn(64, 16, generator=data), torch.randint(0, 3, (64,), generator=data)
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    straight = _build(kind)
    _train(*straight, range(1, 21), x, y)

    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    first = _build(kind)
    _train(*first, range(1, 11), x, y)
    synthprune.save_checkpoint(tmp_path / "ckpt.pt", *first, step=10)
    torch.manual_seed(123), np.random.seed(123), random.seed(123)  # another state, which the load replaces
    resumed = _build(kind)
    assert synthprune.load_checkpoint(tmp_path / "ckpt.pt", *resumed) == {"step": 10}
    _train(*resumed, range(11, 21), x, y)

    for (name, a), b in zip(straight[0].state_dict().items(), resumed[0].state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert resumed[2].step_count == straight[2].step_count == 5
    assert str(straight[1].state_dict()) == str(resumed[1].state_dict())


def test_a_rewirer_state_for_another_wiring_is_refused(tmp_path):
    model, _, rewirer = _build("mlp")
    for _ in range(3):
        rewirer.step(batch=(torch.randn(8, 16), torch.randint(0, 3, (8,))))
    state = rewirer.state_dict()
    fresh, fresh_optimizer, fresh_rewirer = _build("mlp")  # the model was never restored
    expected = r"wiring does not match this rewirer state: fc1 \(has 120 connections, the state was saved with"
    with pytest.raises(ValueError, match=expected + r" \d+\).*load_checkpoint"):
        fresh_rewirer.load_state_dict(state)
    # Restoring the model first and then building a new compressing Rewirer: refused, not regrown.
    fresh.load_state_dict(model.state_dict())
    with pytest.raises(ValueError, match=r"compression only shrinks\. Resuming a compressed run\? Load the rewirer"):
        synthprune.Rewirer(fresh, fresh_optimizer, grow="gradient", compress_to=0.2, compress_end_step=3)
    with pytest.raises(ValueError, match=r"fc1 100 connections, more than the 46 it starts.* Load the rewirer"):
        synthprune.Rewirer(fresh, fresh_optimizer, grow="gradient", compress_to={"fc1": 100}, compress_end_step=3)


def test_a_model_restored_under_a_fresh_rewirer_is_never_regrown():
    model, _, rewirer = _build("mlp")
    for _ in range(3):
        rewirer.step(batch=(torch.randn(8, 16), torch.randint(0, 3, (8,))))
    fresh, _, fresh_rewirer = _build("mlp")  # its plan starts from the initial counts
    fresh.load_state_dict(model.state_dict())  # ...but the model is restored alone
    counts = [layer.nnz for _, layer in synthprune.sparse_layers(fresh)]
    with pytest.raises(ValueError, match=r"would regrow fc1 \(46 -> \d+\).*load_checkpoint"):
        fresh_rewirer.step(batch=(torch.randn(8, 16), torch.randint(0, 3, (8,))))
    assert [layer.nnz for _, layer in synthprune.sparse_layers(fresh)] == counts


def test_a_checkpoint_that_is_not_one_is_refused_by_name(tmp_path):
    model, optimizer, rewirer = _build("mlp")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(FileFormatError, match=re.escape("other.pt: is not a synthprune checkpoint")):
        synthprune.load_checkpoint(tmp_path / "other.pt", model, optimizer, rewirer)
    synthprune.save_checkpoint(tmp_path / "model-only.pt", model)
    with pytest.raises(FileFormatError, match=re.escape("model-only.pt: holds no optimizer state")):
        synthprune.load_checkpoint(tmp_path / "model-only.pt", model, optimizer)
    other = synthprune.SparseMLP([16, 30, 3], epsilon=3, seed=0)
    with pytest.raises(FileFormatError, match=re.escape("model-only.pt: does not fit this model")):
        synthprune.load_checkpoint(tmp_path / "model-only.pt", other)
