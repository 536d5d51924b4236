"""Sparse convolutions: the Rewirer's invariants across every strategy (hypothesis), the masked
convolution against a dense one with the same mask, sparsify on a CNN, synthesis's channel
nodes, the residual network of a CNN with BatchNorm, and half precision on every backend."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from helpers import make_optimizer, snapshot
from synthprune import Rewirer, SparseConv1d, SparseConv2d, SparseMLP, list_strategies, sparse_layers, sparsify
from synthprune.residual import residual_network
from synthprune.strategies import GrowContext, get_grow

GROW = list_strategies()["grow"]
PRUNE = list_strategies()["prune"]


def _cnn(channels, density, generator, kernel=3):
    return nn.Sequential(
        SparseConv2d(2, channels[0], kernel, padding=1, density=density, generator=generator), nn.ReLU(),
        SparseConv2d(channels[0], channels[1], kernel, density=density, generator=generator), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels[1], 3))


@pytest.mark.parametrize("grow", GROW)
@settings(max_examples=15, deadline=None)
@given(prune=st.sampled_from(PRUNE), channels=st.lists(st.integers(1, 6), min_size=2, max_size=2),
       density=st.floats(0.05, 1.0), zeta=st.floats(0.01, 0.99), optimizer_kind=st.sampled_from(["sgd", "adam"]),
       compress=st.booleans(), seed=st.integers(0, 1000))
def test_conv_invariants_hold_after_every_step(grow, prune, channels, density, zeta, optimizer_kind, compress, seed):
    model = _cnn(channels, density, torch.Generator().manual_seed(seed))
    optimizer = make_optimizer(optimizer_kind, model)
    layers = sparse_layers(model)
    budget = [layer.nnz for _, layer in layers]
    compress = compress and all(layer.nnz >= layer.n_out for _, layer in layers)
    targets = {name: max(layer.n_out, layer.nnz // 2) for name, layer in layers}  # halve, one input per channel
    compression = {"compress_to": targets, "compress_end_step": 1} if compress else {}
    options = {"endpoint": "tail"} if grow == "synthesis" and seed % 2 else {}
    rewirer = Rewirer(model, optimizer, prune=prune, grow=grow, zeta=zeta, seed=seed, **compression, **options)
    g = torch.Generator().manual_seed(seed)
    for _ in range(3):
        x, y = torch.randn(4, 2, 6, 6, generator=g), torch.randint(0, 3, (4,), generator=g)
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        before = [snapshot(layer, optimizer) for _, layer in layers]
        fed = [layer.mask.flatten(1).any(1) for _, layer in layers]  # output channels with an input
        reports = rewirer.step(batch=(x, y))
        for (name, layer), report, old, count in zip(layers, reports, before, budget, strict=True):
            layer.check()  # sorted, unique, in range, zero off the mask
            assert layer.nnz == report.connections == report.target  # exact count
            if not compress:
                assert layer.nnz == count and report.pruned == report.grown == (
                    0 if grow == "none" else round(zeta * count))
            param = layer.connection_parameter()
            assert param.grad is None and layer.mask.shape == param.shape
            for state in (v for v in optimizer.state[param].values() if torch.is_tensor(v) and v.numel() > 1):
                assert (state[~layer.mask] == 0).all(), f"{name}: optimizer state at an absent weight"
            for key, (value, state) in snapshot(layer, optimizer).items():
                if old.get(key) != (value, state):  # new connections start at 0 with no momentum
                    assert value == 0 and all(v == 0 for v in state.values()), f"{name} key {key}"
        if compress:  # while compressing, every live output channel that had an input keeps one
            (_, first), (_, second) = layers
            live = second.input_node_degree() > 0
            assert first.mask.flatten(1).any(1)[live & fed[0]].all()
            assert second.mask.flatten(1).any(1)[fed[1]].all()  # it feeds the dense head: all live


@pytest.mark.parametrize("cls, dense_cls, shape", [(SparseConv2d, nn.Conv2d, (3, 4, 9, 7)),
                                                    (SparseConv1d, nn.Conv1d, (3, 4, 11))])
def test_masked_conv_equals_a_dense_conv_with_the_same_mask(cls, dense_cls, shape):
    torch.manual_seed(0)
    sparse = cls(4, 5, 3, stride=2, padding=1, dilation=1, density=0.3, generator=torch.Generator().manual_seed(1))
    dense = dense_cls(4, 5, 3, stride=2, padding=1)
    with torch.no_grad():
        dense.weight.copy_(sparse.weight * sparse.mask)
        dense.bias.copy_(sparse.bias)
    x = torch.randn(*shape, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    y, y2 = sparse(x), dense(x2)
    torch.testing.assert_close(y, y2)
    grad = torch.randn_like(y)
    y.backward(grad)
    y2.backward(grad)
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(sparse.weight.grad, dense.weight.grad * sparse.mask)  # zero off the mask
    torch.testing.assert_close(sparse.bias.grad, dense.bias.grad)
    # the dense gradient that RigL ranks free slots by is the dense convolution's
    x3 = x.detach().clone()
    out = dense(x3)
    out.backward(grad)
    torch.testing.assert_close(sparse.weight_gradient(x3, grad), dense.weight.grad.reshape(5, -1) / 2)
    torch.testing.assert_close(sparse.to_dense()(x3), dense(x3))


def test_sparsify_converts_convolutions_and_keeps_weights_on_request():
    net = nn.Sequential(nn.Conv2d(1, 6, 5), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 4 * 4, 10))
    original = net[0].weight.detach().clone()
    model = sparsify(net, density=0.4, init="keep", exclude=["3"], seed=0)
    assert isinstance(model[0], SparseConv2d) and type(model[3]) is nn.Linear
    assert model[0].nnz == round(0.4 * 150)
    keys = model[0].keys()
    torch.testing.assert_close(model[0].weight.view(-1)[keys], original.view(-1)[keys])
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_synthesis_on_a_convolution_starts_at_strong_channels_and_draws_kernel_positions():
    # 3 input channels of 9 kernel positions; channel 1 carries all the strength.
    n_in, n_out, k = 27, 4, 9
    keys = torch.tensor([0 * n_in + 9, 1 * n_in + 10, 2 * n_in + 11, 3 * n_in + 12])  # channel 1 only
    ctx = GrowContext(n_in, n_out, keys, torch.ones(4), kernel_positions=k)
    proposed = get_grow("synthesis")(ctx, 200, kappa_start=0.5)(200, torch.Generator().manual_seed(0))
    channels, positions = proposed % n_in // k, proposed % n_in % k
    assert (channels == 1).all()  # the only channel with strength above the mean
    assert len(set(positions.tolist())) == k  # kernel positions drawn across the whole kernel


def test_the_residual_network_of_a_cnn_with_batchnorm_computes_the_same():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Unflatten(1, (1, 12, 12)), nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 12, 3), nn.BatchNorm2d(12), nn.ReLU(), nn.Flatten(), nn.Linear(12 * 4 * 4, 20),
        nn.BatchNorm1d(20), nn.ReLU(), nn.Dropout(0.2), nn.Linear(20, 5))
    model = sparsify(net, density=0.1, exclude=["13"], seed=0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
                module.running_mean.normal_(), module.running_var.uniform_(0.5, 2)
                module.weight.normal_(), module.bias.normal_()
            elif getattr(module, "bias", None) is not None:
                module.bias.normal_()  # non-zero biases: constant channels and neurons matter
    model.eval()
    x = torch.randn(16, 144)
    for form in ("csr", "dense"):
        residual, summary = residual_network(model, form=form)
        assert not any(isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) for m in residual)
        torch.testing.assert_close(residual(x), model(x), atol=1e-5, rtol=1e-5)
        assert summary.neurons_after[1:-1] != summary.neurons_before[1:-1]  # something was removed
        assert sum(summary.connections_after) < sum(summary.connections_before)


@pytest.mark.parametrize("backend", ["csr", "masked"])
def test_half_precision_on_every_backend(backend):
    model = SparseMLP([20, 30, 30, 5], epsilon=3, backend=backend, seed=0)
    conv = nn.Sequential(nn.Unflatten(1, (1, 4, 5)), SparseConv2d(1, 3, 3, padding=1, density=0.5), nn.Flatten(),
                         SparseMLP([60, 5], density=0.5, backend=backend, dense_output=False))
    x = torch.randn(8, 20)
    for net in (model, conv):
        reference = net(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast: computes, returns bf16 like nn.Linear
            y = net(x)
        assert y.dtype == torch.bfloat16
        torch.testing.assert_close(y.float(), reference, atol=0.1, rtol=0.05)
        y.float().sum().backward()
        half = net.to(torch.bfloat16)  # a bf16 model: bf16 in, bf16 out, bf16 gradients
        out = half(x.bfloat16())
        out.float().sum().backward()
        assert out.dtype == torch.bfloat16
        assert all(p.grad.dtype == torch.bfloat16 for p in half.parameters() if p.grad is not None)
        torch.testing.assert_close(out.float(), reference, atol=0.1, rtol=0.05)
        net.float()
        Rewirer(net, torch.optim.SGD(net.parameters(), lr=0.1), grow="random").step()  # rewires after all
