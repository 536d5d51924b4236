"""The residual network: same outputs as the sparse model, dead neurons removed to a fixed
point, liveness from the wiring only, save/load."""

import itertools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from synthprune import SparseConv1d, SparseLinear, SparseMLP, load_residual, residual_network, sparse_layers
from synthprune.layers import CSRLinear


def wire(layer, edges, values=None):
    """Give ``layer`` exactly ``edges`` [(out, in)] (values: given or 0.5, 0.6, ...)."""
    keys = torch.tensor([o * layer.in_features + i for o, i in edges], dtype=torch.long)
    order = torch.argsort(keys)
    if values is None:
        values = [0.5 + 0.1 * k for k in range(len(edges))]
    layer.set_connections(keys[order], torch.tensor(values, dtype=torch.float32)[order])


def mlp(sizes, backend="csr", activation="relu", dense_output=False):
    model = SparseMLP(sizes, density=0.5, backend=backend, activation=activation, dense_output=dense_output, seed=0)
    with torch.no_grad():
        for layer in model:
            if hasattr(layer, "bias") and layer.bias is not None:
                layer.bias.copy_(torch.linspace(0.2, 1.0, layer.out_features))  # act(b) != 0: folds matter
    return model.eval()


def assert_same_function(model, residual, n_features, seed=0):
    x = torch.randn(32, n_features, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(residual(x), model(x), atol=1e-5, rtol=1e-5)


def assert_compact(residual):
    """No dead neuron is left: every kept input feeds something, every hidden neuron has an
    input and an output."""
    degrees = []
    for layer in residual.layers:
        if isinstance(layer, SparseLinear):
            rows, cols = layer.edge_index()
        else:  # dense: every entry is a connection
            rows = torch.arange(layer.out_features).repeat_interleave(layer.in_features)
            cols = torch.arange(layer.in_features).repeat(layer.out_features)
        degrees.append((torch.bincount(rows, minlength=layer.out_features),
                        torch.bincount(cols, minlength=layer.in_features)))
    assert (degrees[0][1] > 0).all() or residual.sizes[0] == 0
    for (into, _), (_, out_of) in itertools.pairwise(degrees):
        assert (into > 0).all() and (out_of > 0).all()


def test_chain_of_dead_neurons_is_folded_and_removed():
    # 4 inputs -> 3 -> 3 -> 2 outputs.
    model = mlp([4, 3, 3, 2])
    fc1, fc2, fc3 = (layer for _, layer in sparse_layers(model))
    wire(fc1, [(0, 0), (1, 1), (2, 2)])  # input 3 feeds nothing
    # hidden1 neuron 0 feeds only hidden2 neuron 0, which has no other input -> both fold in turn;
    # hidden1 neuron 2 has an input but no output -> removed, then input 2 feeds nothing.
    wire(fc2, [(0, 0), (1, 1), (2, 1)])
    wire(fc3, [(0, 0), (0, 1), (1, 2)])
    residual, summary = residual_network(model)
    assert summary.neurons_before == [4, 3, 3, 2]
    # input 0 feeds hidden1 neuron 0 which feeds hidden2 neuron 0: all alive. Check by liveness:
    assert residual.sizes == [2, 2, 3, 2]
    assert residual.kept_inputs.tolist() == [0, 1]
    assert_same_function(model, residual, 4)

    # Now cut input 0 -> hidden1 neuron 0: the chain hidden1[0] -> hidden2[0] becomes constant.
    wire(fc1, [(1, 1), (2, 2)])
    residual, summary = residual_network(model)
    assert residual.sizes == [1, 1, 2, 2]
    assert residual.kept_inputs.tolist() == [1]
    assert [k.tolist() for k in residual.kept_neurons] == [[1], [1, 2]]  # original indices
    assert summary.folded_neurons == 2  # hidden1[0], then hidden2[0]
    assert_same_function(model, residual, 4)
    assert_compact(residual)


def test_removal_cascades_backwards_to_a_fixed_point():
    # input 0 -> h1[0] -> h2[0] -> nothing: h2[0] goes first, then h1[0], then input 0.
    model = mlp([3, 2, 2, 2])
    fc1, fc2, fc3 = (layer for _, layer in sparse_layers(model))
    wire(fc1, [(0, 0), (1, 1)])
    wire(fc2, [(0, 0), (1, 1)])
    wire(fc3, [(0, 1), (1, 1)])
    residual, summary = residual_network(model)
    assert residual.sizes == [1, 1, 1, 2] and residual.kept_inputs.tolist() == [1]
    assert summary.folded_neurons == 0
    assert_same_function(model, residual, 3)
    assert_compact(residual)


def test_liveness_comes_from_the_wiring_not_the_values():
    model = mlp([3, 2, 2])
    fc1, fc2 = (layer for _, layer in sparse_layers(model))
    wire(fc1, [(0, 0), (1, 1)], values=[0.0, 0.7])  # a zero-valued connection is still a connection
    wire(fc2, [(0, 0), (1, 1)], values=[0.0, 0.3])
    residual, _ = residual_network(model)
    assert residual.sizes == [2, 2, 2] and residual.connections() == [2, 2]
    assert_same_function(model, residual, 3)


def test_everything_dead_leaves_the_output_biases():
    model = mlp([3, 2, 2])
    fc1, fc2 = (layer for _, layer in sparse_layers(model))
    wire(fc1, [(0, 0)])
    wire(fc2, [(1, 1)])  # hidden 1 has no input: folds; hidden 0 has no output: removed
    residual, summary = residual_network(model)
    assert residual.sizes == [0, 0, 2] and summary.folded_neurons == 1
    assert_same_function(model, residual, 3)


@pytest.mark.parametrize("backend", ["csr", "masked"])
@pytest.mark.parametrize("form", ["csr", "dense"])
@given(
    sizes=st.lists(st.integers(1, 12), min_size=3, max_size=5),
    density=st.floats(0.02, 0.6), activation=st.sampled_from(["relu", "tanh", "sigmoid"]),
    dense_output=st.booleans(), seed=st.integers(0, 10_000),
)
def test_compact_network_matches_the_sparse_one(backend, form, sizes, density, activation, dense_output, seed):
    g = torch.Generator().manual_seed(seed)
    model = SparseMLP(sizes, density=density, backend=backend, activation=activation, dense_output=dense_output,
                      seed=seed)
    with torch.no_grad():  # random sparse wiring (many dead neurons), random biases
        for _, layer in sparse_layers(model):
            count = int(torch.randint(0, layer.in_features * layer.out_features + 1, (1,), generator=g))
            count = min(count, max(0, round(density * layer.in_features * layer.out_features)))
            keys = torch.randperm(layer.in_features * layer.out_features, generator=g)[:count].sort().values
            layer.set_connections(keys, torch.randn(count, generator=g))
        for module in model:
            if getattr(module, "bias", None) is not None:
                module.bias.copy_(torch.randn(module.out_features, generator=g))
    model.eval()
    residual, summary = residual_network(model, form=form)
    assert_same_function(model, residual, sizes[0], seed)
    if form == "csr":
        assert_compact(residual)
    assert summary.neurons_after[-1] == sizes[-1]  # outputs are never removed
    assert all(a <= b for a, b in zip(summary.neurons_after, summary.neurons_before, strict=True))
    if form == "csr":
        assert sum(summary.connections_after) <= sum(summary.connections_before)
        sparse_in_model = [isinstance(m, SparseLinear) for m in model if isinstance(m, (SparseLinear, torch.nn.Linear))]
        for layer, was_sparse in zip(residual.layers, sparse_in_model, strict=True):
            if was_sparse and min(layer.in_features, layer.out_features) > 0:
                assert isinstance(layer, CSRLinear)


@pytest.mark.parametrize("form", ["csr", "dense"])
def test_saved_and_loaded_residual_gives_identical_outputs(tmp_path, form):
    model = SparseMLP([20, 16, 16, 5], epsilon=1, seed=3).eval()
    residual, _ = residual_network(model, form=form)
    from synthprune.residual import save_residual

    save_residual(residual, tmp_path / "r")
    loaded = load_residual(tmp_path / "r")
    x = torch.randn(9, 20)
    assert torch.equal(loaded(x), residual(x))
    assert loaded.kept_inputs.tolist() == residual.kept_inputs.tolist() and loaded.sizes == residual.sizes
    assert [k.tolist() for k in loaded.kept_neurons] == [k.tolist() for k in residual.kept_neurons]


def test_load_residual_reports_missing_and_corrupt_files(tmp_path):
    with pytest.raises(ValueError, match="synthprune residual RUN"):
        load_residual(tmp_path)
    model = SparseMLP([8, 6, 3], epsilon=1, seed=0).eval()
    from synthprune.residual import save_residual

    save_residual(residual_network(model)[0], tmp_path / "r")
    (tmp_path / "r" / "model.safetensors").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_residual(tmp_path / "r")


def test_a_compiled_model_gives_the_residual_network_of_what_it_compiled():
    model = mlp([6, 5, 4])
    compiled = torch.compile(model, backend="eager")  # the eager backend: no compiler needed
    residual, _ = residual_network(compiled)
    assert_same_function(model, residual, 6)


def test_residual_network_refuses_models_it_cannot_fold():
    with pytest.raises(ValueError, match=r"needs an nn\.Sequential, got Linear"):
        residual_network(torch.nn.Linear(3, 2))
    with pytest.raises(ValueError, match=r"cannot handle module '1' \(GRU\)"):
        residual_network(torch.nn.Sequential(SparseLinear(4, 3, connections=4), torch.nn.GRU(3, 3)))
    with pytest.raises(ValueError, match=r"folds BatchNorm only directly after .* .2. follows ReLU"):
        residual_network(torch.nn.Sequential(SparseLinear(4, 3, connections=4), torch.nn.ReLU(),
                                             torch.nn.BatchNorm1d(3)))
    with pytest.raises(ValueError, match=r"cannot handle module '0' \(SparseConv1d\)"):
        residual_network(torch.nn.Sequential(SparseConv1d(1, 2, 3, density=0.5), torch.nn.Flatten()))
    with pytest.raises(ValueError, match="needs example_input"):
        residual_network(torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Flatten()))
    with pytest.raises(ValueError, match="unknown form"):
        residual_network(SparseMLP([4, 3, 2], epsilon=1), form="coo")
