"""SparseLinear backends: agreement, gradients, state dicts, conversions, errors."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from synthprune import SparseLinear, SparseMLP, TopologyError, sparse_layers, sparsify
from synthprune.layers import CSRLinear, DenseLinear, MaskedLinear


def make(backend, n_in=20, n_out=15, seed=0, **kw):
    if not {"epsilon", "density", "connections"} & set(kw):
        kw["density"] = 0.3
    return SparseLinear(n_in, n_out, backend=backend, generator=torch.Generator().manual_seed(seed), **kw)


def test_factory_returns_backend_class():
    assert type(make("csr")) is CSRLinear and type(make("masked")) is MaskedLinear
    assert isinstance(make("csr"), SparseLinear)


@given(n_in=st.integers(1, 40), n_out=st.integers(1, 40), density=st.floats(0.01, 1.0),
       batch=st.integers(1, 9), seed=st.integers(0, 10_000))
def test_backends_agree_on_outputs_and_gradients(n_in, n_out, density, batch, seed):
    csr = make("csr", n_in, n_out, seed, density=density)
    masked = make("masked", n_in, n_out, seed, density=density)
    assert torch.equal(csr.keys(), masked.keys())
    torch.testing.assert_close(csr.connection_values(), masked.connection_values())
    x = torch.randn(batch, n_in, generator=torch.Generator().manual_seed(seed + 1))
    xc, xm = x.clone().requires_grad_(), x.clone().requires_grad_()
    yc, ym = csr(xc), masked(xm)
    torch.testing.assert_close(yc, ym, atol=1e-5, rtol=1e-5)
    weights = torch.randn_like(yc)
    (yc * weights).sum().backward()
    (ym * weights).sum().backward()
    torch.testing.assert_close(xc.grad, xm.grad, atol=1e-5, rtol=1e-5)
    keys = masked.keys()
    torch.testing.assert_close(csr.values.grad, masked.weight.grad.view(-1)[keys], atol=1e-5, rtol=1e-5)
    assert (masked.weight.grad.view(-1)[~masked.mask.view(-1)] == 0).all()  # no gradient off the mask
    torch.testing.assert_close(csr.bias.grad, masked.bias.grad, atol=1e-5, rtol=1e-5)


def test_csr_gradients_match_dense_autograd():
    layer = make("csr", 30, 25, density=0.2)
    dense = layer.to_dense()
    x = torch.randn(7, 30, dtype=torch.float64)
    layer, dense = layer.double(), dense.double()
    xs, xd = x.clone().requires_grad_(), x.clone().requires_grad_()
    layer(xs).pow(2).sum().backward()
    dense(xd).pow(2).sum().backward()
    torch.testing.assert_close(xs.grad, xd.grad)
    torch.testing.assert_close(layer.values.grad, dense.weight.grad.view(-1)[layer.keys()])
    torch.testing.assert_close(layer.bias.grad, dense.bias.grad)


@pytest.mark.parametrize("bias", [True, False])
def test_csr_gradcheck(bias):
    # The bias is written into the product's output (addmm), so its gradient is ours too.
    layer = make("csr", 6, 5, density=0.5, bias=bias).double()
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    values = layer.values.detach().clone().requires_grad_()
    if bias:
        offsets = torch.randn(5, dtype=torch.float64, requires_grad=True)
        as_function = lambda inp, vals, b: torch.func.functional_call(layer, {"values": vals, "bias": b}, (inp,))
        assert torch.autograd.gradcheck(as_function, (x, values, offsets))
    else:
        as_function = lambda inp, vals: torch.func.functional_call(layer, {"values": vals}, (inp,))
        assert torch.autograd.gradcheck(as_function, (x, values))


def test_csr_accepts_inputs_in_either_layout():
    # Row-major inputs (the network's own) and transposed views (a previous sparse layer's
    # output) give the same results and gradients.
    layer = make("csr", 30, 25, density=0.2).double()
    x = torch.randn(7, 30, dtype=torch.float64)
    transposed = x.t().contiguous().t()
    a, b = x.clone().requires_grad_(), transposed.clone().requires_grad_()
    layer(a).pow(2).sum().backward()
    grads = layer.values.grad.clone(), layer.bias.grad.clone()
    layer.zero_grad()
    layer(b).pow(2).sum().backward()
    torch.testing.assert_close(a.grad, b.grad)
    torch.testing.assert_close(grads, (layer.values.grad, layer.bias.grad))


def test_extra_leading_dims(backend):
    layer = make(backend)
    y = layer(torch.randn(2, 3, 20))
    assert y.shape == (2, 3, 15)


def test_edge_index_and_density(backend):
    layer = make(backend, 20, 15, connections=37)
    edges = layer.edge_index()
    assert edges.shape == (2, 37) and layer.nnz == 37
    assert layer.density == pytest.approx(37 / 300)
    assert (edges[0] < 15).all() and (edges[1] < 20).all()
    assert torch.equal(edges[0] * 20 + edges[1], layer.keys())


@pytest.mark.parametrize("target", ["csr", "masked"])
def test_conversions_preserve_function(backend, target):
    layer = make(backend)
    x = torch.randn(4, 20)
    other = layer.to_backend(target)
    assert other.backend == target and torch.equal(other.keys(), layer.keys())
    torch.testing.assert_close(other(x), layer(x))
    torch.testing.assert_close(layer.to_dense()(x), layer(x), atol=1e-6, rtol=1e-5)


def test_state_dict_alone_restores_a_different_topology(backend):
    source = make(backend, seed=1, connections=50)
    target = make(backend, seed=2, connections=80)  # other wiring, other nnz
    target.load_state_dict(source.state_dict())
    assert torch.equal(target.keys(), source.keys()) and target.nnz == 50
    x = torch.randn(3, 20)
    torch.testing.assert_close(target(x), source(x))
    target.check()


def test_model_state_dict_restores_wiring(backend, tmp_path):
    a = SparseMLP([12, 16, 16, 4], epsilon=2, backend=backend, seed=0)
    b = SparseMLP([12, 16, 16, 4], epsilon=3, backend=backend, seed=1)
    torch.save(a.state_dict(), tmp_path / "m.pt")
    b.load_state_dict(torch.load(tmp_path / "m.pt", weights_only=True))
    for (_, la), (_, lb) in zip(sparse_layers(a), sparse_layers(b), strict=True):
        assert torch.equal(la.keys(), lb.keys())
    x = torch.randn(5, 12)
    torch.testing.assert_close(a(x), b(x))


def test_check_detects_weight_outside_mask():
    layer = make("masked")
    with torch.no_grad():
        layer.weight.view(-1)[(~layer.mask).view(-1).nonzero()[0]] = 1.0
    with pytest.raises(TopologyError, match="outside its mask"):
        layer.check()


def test_bad_input_shape_names_expected_width(backend):
    with pytest.raises(ValueError, match=r"\[\.\.\., 20\].*\(4, 7\)"):
        make(backend)(torch.randn(4, 7))


def test_set_connections_validates(backend):
    layer = make(backend)
    with pytest.raises(ValueError, match="must match"):
        layer.set_connections(torch.tensor([1, 2]), torch.zeros(3))
    with pytest.raises(TopologyError):
        layer.set_connections(torch.tensor([2, 1]), torch.zeros(2))


def test_constructor_errors():
    with pytest.raises(ValueError, match=r"unknown backend 'coo'; valid: csr, masked"):
        SparseLinear(4, 4, backend="coo")
    with pytest.raises(ValueError, match="epsilon must be > 0, got -1"):
        SparseLinear(4, 4, epsilon=-1)
    with pytest.raises(ValueError, match="at most one"):
        SparseLinear(4, 4, epsilon=1, density=0.5)
    with pytest.raises(ValueError, match="unknown init 'xavier'"):
        SparseLinear(4, 4, init="xavier")
    with pytest.raises(ValueError, match="density must be in"):
        SparseLinear(4, 4, density=1.5)


def test_sparse_kaiming_scales_with_sparse_fan_in():
    layer = SparseLinear(1000, 1000, epsilon=20, generator=torch.Generator().manual_seed(0))
    fan_in = layer.nnz / 1000  # 40
    assert layer.values.std().item() == pytest.approx((2 / fan_in) ** 0.5, rel=0.05)


def test_sparse_mlp_counts_and_dense_output():
    model = SparseMLP([784, 1000, 1000, 1000, 10], epsilon=20, seed=0)
    layers = dict(sparse_layers(model))
    assert [layer.nnz for layer in layers.values()] == [20 * 1784, 20 * 2000, 20 * 2000]
    assert type(model.fc4) is DenseLinear and isinstance(model.fc4, nn.Linear)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_sparse_mlp_seed_is_reproducible_and_ignores_global_rng(backend):
    torch.manual_seed(1)
    a = SparseMLP([10, 8, 3], epsilon=1, backend=backend, seed=5)
    torch.manual_seed(2)
    b = SparseMLP([10, 8, 3], epsilon=1, backend=backend, seed=5)
    for pa, pb in zip(a.state_dict().values(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb)


def test_sparse_mlp_errors():
    with pytest.raises(ValueError, match="unknown activation 'swish'; valid: relu"):
        SparseMLP([4, 4, 2], activation="swish")
    with pytest.raises(ValueError, match="unknown backend"):
        SparseMLP([4, 4, 2], backend="dense")
    with pytest.raises(ValueError, match="sizes"):
        SparseMLP([4])


def test_sparsify_converts_user_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(50, 40), nn.ReLU(), nn.Sequential(nn.Linear(40, 30), nn.ReLU()), nn.Linear(30, 5))
    sparsify(model, density=0.1, distribution="erk", exclude=["3"], seed=0)
    names = [name for name, _ in sparse_layers(model)]
    assert names == ["0", "2.0"] and type(model[3]) is nn.Linear
    assert model(torch.randn(2, 50)).shape == (2, 5)


def test_sparsify_keep_init_keeps_pretrained_weights(backend):
    linear = nn.Linear(30, 20)
    sparse = sparsify(nn.Sequential(linear), epsilon=2, backend=backend, init="keep", seed=0)[0]
    torch.testing.assert_close(sparse.connection_values(), linear.weight.detach().view(-1)[sparse.keys()])
    torch.testing.assert_close(sparse.bias, linear.bias)


def test_sparsify_errors():
    model = nn.Sequential(nn.Linear(5, 5))
    with pytest.raises(ValueError, match=r"exclude names no linear or convolution layer: \['head'\]"):
        sparsify(model, epsilon=1, exclude=["head"])
    with pytest.raises(ValueError, match="exactly one"):
        sparsify(model)
    with pytest.raises(ValueError, match="unknown distribution"):
        sparsify(model, density=0.5, distribution="normal")


def test_deepcopy_and_pickle_keep_the_layer(backend):
    import copy
    import pickle

    model = SparseMLP([10, 12, 3], epsilon=2, backend=backend, seed=0)
    x = torch.randn(4, 10)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert type(clone.fc1) is type(model.fc1)
        torch.testing.assert_close(clone(x), model(x))


@pytest.mark.parametrize("bias", [True, False])
def test_dense_linear_gives_nn_linear_results_in_either_layout(bias):
    layer = DenseLinear(30, 10, bias=bias).double()
    reference = nn.Linear(30, 10, bias=bias).double()
    reference.load_state_dict(layer.state_dict())
    x = torch.randn(7, 30, dtype=torch.float64)
    for inputs in (x, x.t().contiguous().t()):  # row-major, and a csr layer's output layout
        a, b = inputs.clone().requires_grad_(), inputs.clone().requires_grad_()
        layer.zero_grad()
        reference.zero_grad()
        layer(a).pow(2).sum().backward()
        reference(b).pow(2).sum().backward()
        torch.testing.assert_close(a.grad, b.grad)
        for p, q in zip(layer.parameters(), reference.parameters(), strict=True):
            torch.testing.assert_close(p.grad, q.grad)
