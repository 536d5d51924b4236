"""Rewriting an exported ONNX graph so that its file keeps the compression.

``torch.onnx.export`` writes every weight as a dense matrix: a network compressed to 1% takes
the dense network's 11 MB. :func:`compress_graph` rewrites the graph's weights that are mostly
zeros into one of two sparse forms, chosen per layer:

- **computed sparse** (``"gather"``), for a linear layer: ``Gather`` the inputs of every
  connection, ``Mul`` by the values, ``ScatterND`` (reduction ``add``) into the outputs. File
  and work both grow with the connections, not the dense shape. Indices are stored as int16
  (int32 past 32,767) and cast to int64 in the graph.
- **sparse initializer** (``"initializer"``): the weight is stored as an ONNX
  ``SparseTensorProto`` (values and int64 flat indices), which the runtime densifies when it
  loads the model. File size grows with the connections, speed is the dense layer's; this is
  the only sparse form for convolutions.

Which is faster depends on density and batch. Measured on this project's machine with
onnxruntime, one thread (benchmarks/README.md, "ONNX"): at 4.5% density the gathered form was
2-6x slower than the dense ``Gemm``; at 1% it was 2x faster at batch 256 and 1.6x slower at
batch 1 (0.44 against 0.27 ms); at 0.2% it was 2x faster at batch 1 and 5x at batch 256.
``form="auto"`` therefore computes sparse at or below ``GATHER_DENSITY`` (2%) and stores a
sparse initializer above it; ``"densify"`` stores every sparse weight as a sparse initializer
(the smallest latency at batch 1 down to ~1%). Needs the ``onnx`` package.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FORMS = ("auto", "sparse", "densify", "dense")
GATHER_DENSITY = 0.02  # at or below: computed sparse under form="auto" (measured, see above)
SPARSE_DENSITY = 0.5  # above: a weight stays dense whatever the form (nothing to gain)


@dataclass
class LayerChoice:
    """What was done with one weight of the graph."""

    name: str  # the initializer's name (the parameter's path, e.g. "layers.0.weight")
    shape: tuple[int, ...]
    connections: int  # non-zero weights
    form: str  # "gather", "initializer" or "dense"

    @property
    def density(self) -> float:
        return self.connections / max(1, int(np.prod(self.shape)))


def check_form(form: str) -> str:
    if form not in FORMS:
        raise ValueError(f"ONNX form must be one of {', '.join(FORMS)}, got {form!r}")
    return form


def compress_graph(model, form: str = "auto") -> list[LayerChoice]:
    """Rewrite ``model`` (an ``onnx.ModelProto``, changed in place) per ``form``; returns what
    was done with each weight of rank 2 (linear) or 4 (convolution) of density ≤ 50%.

    ``"dense"`` changes nothing; ``"sparse"`` computes every such linear layer sparse (gather);
    ``"densify"`` stores every such weight as a sparse initializer; ``"auto"`` computes sparse at
    or below ``GATHER_DENSITY`` and otherwise stores a sparse initializer. Linear layers are
    recognised as ``Gemm`` or ``MatMul`` nodes whose weight is an initializer; other consumers
    of a sparse weight (convolutions) get a sparse initializer."""
    from onnx import numpy_helper

    check_form(form)
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    choices = []
    for name, init in list(initializers.items()):
        if len(init.dims) not in (2, 4) or init.data_type != 1:  # float32 matrices and kernels
            continue
        weight = numpy_helper.to_array(init)
        nonzero = int(np.count_nonzero(weight))
        if form == "dense" or nonzero > SPARSE_DENSITY * weight.size:
            choices.append(LayerChoice(name, weight.shape, nonzero, "dense"))
            continue
        users = consumers.get(name, [])
        linear = len(users) == 1 and _linear_weight(users[0], name) is not None
        gather = linear and (form == "sparse" or (form == "auto" and nonzero <= GATHER_DENSITY * weight.size))
        if gather:
            _gather_layer(graph, users[0], init, _linear_weight(users[0], name)(weight))
        else:
            _sparse_initializer(graph, init, weight)
        choices.append(LayerChoice(name, weight.shape, nonzero, "gather" if gather else "initializer"))
    return choices


def _attributes(node) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _linear_weight(node, name: str):
    """For a node computing ``x @ Wᵀ (+ b)`` with ``name`` as its weight, a function from the
    stored array to ``W`` [n_out, n_in]; ``None`` for anything else."""
    attributes = _attributes(node)
    if node.op_type == "Gemm" and len(node.input) >= 2 and node.input[1] == name and node.input[0] != name:
        if attributes.get("transA", 0) or attributes.get("alpha", 1.0) != 1.0 or attributes.get("beta", 1.0) != 1.0:
            return None
        return (lambda w: w) if attributes.get("transB", 0) else (lambda w: w.T)
    if node.op_type == "MatMul" and list(node.input).index(name) == 1:
        return lambda w: w.T  # x [B, n_in] @ w [n_in, n_out]
    return None


def _sparse_initializer(graph, init, weight: np.ndarray) -> None:
    """Move ``init`` to the graph's sparse initializers: its non-zeros and their flat indices."""
    from onnx import helper, numpy_helper

    flat = weight.reshape(-1)
    where = np.flatnonzero(flat)
    values = numpy_helper.from_array(flat[where].astype(np.float32), init.name)
    indices = numpy_helper.from_array(where.astype(np.int64), init.name + ".indices")
    graph.sparse_initializer.append(helper.make_sparse_tensor(values, indices, list(init.dims)))
    graph.initializer.remove(init)


def _gather_layer(graph, node, init, weight: np.ndarray) -> None:
    """Replace the linear ``node`` (``x [B, n_in] -> [B, n_out]``) with the computed sparse
    form, in the batch-minor layout where each connection moves a row of B values:
    ``xᵀ = Transpose(x)``; ``Gather(xᵀ, cols)`` [nnz, B]; ``Mul`` by the values [nnz, 1];
    ``ScatterND`` (add) at the rows into zeros [n_out, B]; ``Transpose``; ``Add`` the bias."""
    from onnx import TensorProto, helper, numpy_helper

    rows, cols = np.nonzero(weight)  # row-major order: the connections sorted by output
    n_out = weight.shape[0]
    store = np.int16 if max(weight.shape) <= np.iinfo(np.int16).max else np.int32
    name, x, out = init.name, node.input[0], node.output[0]
    bias = node.input[2] if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2] else None
    graph.initializer.remove(init)
    graph.initializer.extend([
        numpy_helper.from_array(weight[rows, cols].astype(np.float32)[:, None], f"{name}.values"),
        numpy_helper.from_array(cols.astype(store), f"{name}.cols"),
        numpy_helper.from_array(rows.astype(store)[:, None], f"{name}.rows"),
        numpy_helper.from_array(np.array([n_out], dtype=np.int64), f"{name}.n_out"),
    ])
    t = f"{name}/"  # the names of this layer's intermediate values
    zero = numpy_helper.from_array(np.zeros(1, dtype=np.float32))
    nodes = [
        helper.make_node("Cast", [f"{name}.cols"], [t + "cols"], to=TensorProto.INT64),
        helper.make_node("Cast", [f"{name}.rows"], [t + "rows"], to=TensorProto.INT64),
        helper.make_node("Transpose", [x], [t + "x_t"], perm=[1, 0]),
        helper.make_node("Gather", [t + "x_t", t + "cols"], [t + "inputs"], axis=0),
        helper.make_node("Mul", [t + "inputs", f"{name}.values"], [t + "terms"]),
        helper.make_node("Shape", [x], [t + "batch"], start=0, end=1),
        helper.make_node("Concat", [f"{name}.n_out", t + "batch"], [t + "out_shape"], axis=0),
        helper.make_node("ConstantOfShape", [t + "out_shape"], [t + "zeros"], value=zero),
        helper.make_node("ScatterND", [t + "zeros", t + "rows", t + "terms"], [t + "y_t"], reduction="add"),
        helper.make_node("Transpose", [t + "y_t"], [t + "y" if bias else out], perm=[1, 0]),
    ]
    if bias:
        nodes.append(helper.make_node("Add", [t + "y", bias], [out]))
    position = list(graph.node).index(node)
    graph.node.remove(node)
    for offset, new in enumerate(nodes):
        graph.node.insert(position + offset, new)
