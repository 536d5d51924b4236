"""ONNX that keeps the compression: synthprune.export_onnx of residual MLPs and CNNs and of
trained sparse models, in every form, matches PyTorch in onnxruntime to 1e-5; sparse files grow
with the connections; the graph rewriting is checked on hand-made graphs; torch.export of a
residual network works or says what it cannot trace."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import synthprune
from synthprune import Rewirer, SparseMLP, residual_network
from synthprune.models import SparseCNN

onnx = pytest.importorskip("onnx", reason="the [onnx] extra is not installed")
ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")

from synthprune.onnx_graph import GATHER_DENSITY, compress_graph  # noqa: E402  (needs onnx)


def compressed_mlp(target: float, seed: int = 0, sizes=(64, 120, 80, 10), epsilon: float = 8) -> SparseMLP:
    torch.manual_seed(seed)
    model = SparseMLP(list(sizes), epsilon=epsilon)
    for layer in model.modules():
        if hasattr(layer, "bias") and layer.bias is not None:
            nn.init.normal_(layer.bias, std=0.1)  # non-zero biases: the bias path is exported too
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    Rewirer(model, optimizer, grow="none", prune="magnitude", compress_to=target, compress_end_step=0).step()
    return model.eval()


def run_onnx(path, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x.numpy()})[0]


@pytest.mark.parametrize("form", ["auto", "sparse", "densify", "dense"])
def test_residual_mlp_export_matches_pytorch_in_every_form(tmp_path, form):
    model = compressed_mlp(0.05)
    residual, _ = residual_network(model)
    written = synthprune.export_onnx(residual, tmp_path / "m.onnx", form=form)
    assert written.path.stat().st_size == written.bytes
    for batch in (1, 37, 256):  # the batch dimension is dynamic
        x = torch.randn(batch, 64)
        np.testing.assert_allclose(run_onnx(written.path, x), residual(x).detach().numpy(), atol=1e-5, rtol=1e-5)
    sparse_layers = [layer for layer in written.layers if layer.density < 0.5]
    assert sparse_layers, written.layers
    expected = {"dense": {"dense"}, "sparse": {"gather"}, "densify": {"initializer"},
                "auto": {"gather" if layer.density <= GATHER_DENSITY else "initializer" for layer in sparse_layers}}
    assert {layer.form for layer in sparse_layers} == expected[form]


def test_the_sparse_file_grows_with_the_connections_not_the_dense_shape(tmp_path):
    sizes = {}
    for target in (0.05, 0.01):
        model = compressed_mlp(target, sizes=(256, 400, 400, 10), epsilon=20)
        residual, _ = residual_network(model)
        synthprune.save_residual(residual, tmp_path / f"r{target}")
        safetensors = (tmp_path / f"r{target}" / "model.safetensors").stat().st_size
        for form in ("auto", "sparse", "densify", "dense"):
            written = synthprune.export_onnx(model, tmp_path / f"{target}-{form}.onnx", form=form)
            sizes[target, form] = written.bytes
        # the bound: the sparse file at most 3x the safetensors residual
        assert max(sizes[target, form] for form in ("auto", "sparse", "densify")) <= 3 * safetensors
    assert sizes[0.01, "sparse"] < sizes[0.05, "sparse"] < sizes[0.05, "dense"]
    assert sizes[0.01, "auto"] < sizes[0.05, "auto"]


def test_a_trained_sparse_model_exports_through_its_residual_network(tmp_path):
    model = compressed_mlp(0.03)
    written = synthprune.export_onnx(model, tmp_path / "m.onnx")
    x = torch.randn(9, 64)
    np.testing.assert_allclose(run_onnx(written.path, x), model(x).detach().numpy(), atol=1e-5, rtol=1e-5)
    dense_first = onnx.load(str(written.path)).graph
    residual, _ = residual_network(model)
    assert written.layers[0].shape == (residual.sizes[1], residual.sizes[0])  # dead inputs and neurons gone
    assert len(dense_first.node) > 0


def test_residual_cnn_export_matches_pytorch(tmp_path):
    torch.manual_seed(1)
    cnn = SparseCNN((12, 12), 10, channels=(4, 6), hidden=(30,), density=0.1).eval()
    residual, _ = residual_network(cnn)
    for form in ("auto", "sparse"):
        written = synthprune.export_onnx(residual, tmp_path / f"cnn-{form}.onnx", form=form)
        x = torch.randn(5, 144)
        np.testing.assert_allclose(run_onnx(written.path, x), cnn(x).detach().numpy(), atol=1e-5, rtol=1e-5)
        kernels = [layer for layer in written.layers if len(layer.shape) == 4 and layer.form != "dense"]
        assert kernels and all(layer.form == "initializer" for layer in kernels)  # convolutions: stored sparse


def test_a_bad_form_and_an_unknown_input_size_are_named(tmp_path):
    model = compressed_mlp(0.05)
    with pytest.raises(ValueError, match="ONNX form must be one of auto, sparse, densify, dense"):
        synthprune.export_onnx(model, tmp_path / "m.onnx", form="csr")
    odd = nn.Sequential(nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="pass example_input"):
        synthprune.export_onnx(odd, tmp_path / "odd.onnx")
    written = synthprune.export_onnx(odd, tmp_path / "odd.onnx", example_input=torch.zeros(2, 4))
    x = torch.randn(3, 4)
    np.testing.assert_allclose(run_onnx(written.path, x), odd(x).detach().numpy(), atol=1e-6)


def linear_graph(weight: np.ndarray, bias: np.ndarray | None, op: str):
    """A one-layer ONNX model ``x [B, n_in] -> [B, n_out]``: Gemm (transB=1 or 0) or MatMul."""
    from onnx import TensorProto, helper, numpy_helper

    n_out, n_in = weight.shape
    inputs = ["input", "w"] + (["b"] if bias is not None and op != "matmul" else [])
    initializers = [numpy_helper.from_array(weight if op == "gemm_t" else weight.T.copy(), "w")]
    if bias is not None:
        initializers.append(numpy_helper.from_array(bias, "b"))
    if op == "matmul":
        nodes = [helper.make_node("MatMul", ["input", "w"], ["mm" if bias is not None else "logits"])]
        nodes += [helper.make_node("Add", ["mm", "b"], ["logits"])] if bias is not None else []
    else:
        nodes = [helper.make_node("Gemm", inputs, ["logits"], transB=1 if op == "gemm_t" else 0)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["B", n_in])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["B", n_out])],
                              initializer=initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


@settings(max_examples=15)
@given(n_in=st.integers(1, 40), n_out=st.integers(1, 40), density=st.floats(0.0, 0.5), batch=st.integers(1, 9),
       op=st.sampled_from(["gemm_t", "gemm", "matmul"]), bias=st.booleans(),
       form=st.sampled_from(["auto", "sparse", "densify"]),
       seed=st.integers(0, 1000))
def test_compress_graph_computes_what_the_dense_graph_does(tmp_path_factory, n_in, n_out, density, batch, op,
                                                           bias, form, seed):
    rng = np.random.default_rng(seed)
    weight = (rng.standard_normal((n_out, n_in)) * (rng.random((n_out, n_in)) < density)).astype(np.float32)
    b = rng.standard_normal(n_out).astype(np.float32) if bias else None
    model = linear_graph(weight, b, op)
    choices = compress_graph(model, form)
    onnx.checker.check_model(model)
    assert [c.connections for c in choices] == [int(np.count_nonzero(weight))]
    path = tmp_path_factory.mktemp("g") / "m.onnx"
    onnx.save(model, str(path))
    x = rng.standard_normal((batch, n_in)).astype(np.float32)
    expected = x @ weight.T + (b if b is not None else 0)
    np.testing.assert_allclose(run_onnx(path, torch.from_numpy(x)), expected, atol=1e-5, rtol=1e-5)


def test_torch_export_of_a_residual_network_works_or_names_what_it_cannot_trace(monkeypatch):
    from synthprune import csr_kernel

    residual, _ = residual_network(compressed_mlp(0.05))
    x = torch.randn(4, 64)
    if csr_kernel.ops() is not None:  # the fast kernel's ops have shape functions: traceable
        program = torch.export.export(residual, (x,))
        torch.testing.assert_close(program.module()(x), residual(x))
    monkeypatch.setenv(csr_kernel.ENV, "torch")
    with pytest.raises(RuntimeError, match=r"torch\.export cannot trace a csr layer on the torch\.sparse path"):
        torch.export.export(residual, (x,))
    dense, _ = residual_network(compressed_mlp(0.05), form="dense")  # the way round it
    torch.testing.assert_close(torch.export.export(dense, (x,)).module()(x), dense(x))
