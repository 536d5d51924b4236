"""``SparseLinear``: a linear layer with a sparse, rewirable set of connections.

Two backends behind one interface (pick with ``backend=``):

* ``"csr"`` (:class:`CSRLinear`) -- truly sparse. The connection values are the trainable
  Parameter ``values`` ``[nnz]``; ``crow_indices`` ``[n_out + 1]`` and ``col_indices``
  ``[nnz]`` are persistent buffers. Forward is a CSR × dense product; backward uses a cached
  transpose for the input gradient and a sampled product (SDDMM) for the value gradient, so no
  ``n_out × n_in`` tensor is ever formed. The CPU default.
* ``"masked"`` (:class:`MaskedLinear`) -- a dense ``weight`` and a persistent boolean ``mask``;
  absent weights are held at exactly 0. Simple and GPU-friendly.

Both store the topology in ``state_dict()``, so loading a state dict alone restores the exact
wiring (even when its number of connections differs from the layer's current one). Both list
their connections in the same canonical order -- sorted keys ``row * n_in + col`` -- so the
same seed gives the same topology, values and gradients on either backend.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from synthprune import csr_kernel
from synthprune.topology import TopologyError, check_topology, er_count, keys_to_edge_index, random_keys, uniform_count

__all__ = [
    "BACKENDS", "INITS", "CSRLinear", "DenseLinear", "MaskedConnections", "MaskedLinear", "SparseLayer", "SparseLinear",
    "keep_dense_weights",
]

BACKENDS = ("csr", "masked")
INITS = ("sparse_kaiming", "dense_default")

# PyTorch marks CSR as beta and says so once per process; it is what this backend is built on.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; valid: {', '.join(BACKENDS)}")
    return backend


def resolve_count(
    n_in: int, n_out: int, epsilon: float | None, density: float | None, connections: int | None
) -> int:
    """Number of connections from at most one of ε (Erdős–Rényi), density or an exact count;
    ε = 20 when none is given."""
    options = (("epsilon", epsilon), ("density", density), ("connections", connections))
    given = [name for name, value in options if value is not None]
    if len(given) > 1:
        raise ValueError(f"give at most one of epsilon, density, connections; got {', '.join(given)}")
    if density is not None:
        return uniform_count(n_in, n_out, density)
    if connections is not None:
        if not 1 <= connections <= n_in * n_out:
            raise ValueError(
                f"connections must be in [1, {n_in * n_out}] for a {n_out}x{n_in} layer, got {connections}"
            )
        return int(connections)
    return er_count(n_in, n_out, 20.0 if epsilon is None else epsilon)


def initial_values(
    init: str, count: int, n_in: int, n_out: int, generator: torch.Generator | None, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Initial connection values ``[count]`` and bias ``[n_out]`` (on CPU).

    ``"sparse_kaiming"``: He-normal with the layer's *actual* mean in-degree ``count / n_out``
    as fan-in, bias 0 -- with the dense fan-in a 4%-dense layer's signal nearly vanishes.
    ``"dense_default"``: PyTorch's ``nn.Linear`` default, ``U(±1/√n_in)`` for weights and bias.
    """
    if init == "sparse_kaiming":
        fan_in = max(1.0, count / n_out)
        values = torch.randn(count, generator=generator, dtype=dtype) * math.sqrt(2.0 / fan_in)
        return values, torch.zeros(n_out, dtype=dtype)
    if init == "dense_default":
        bound = 1.0 / math.sqrt(n_in)
        values = torch.empty(count, dtype=dtype).uniform_(-bound, bound, generator=generator)
        return values, torch.empty(n_out, dtype=dtype).uniform_(-bound, bound, generator=generator)
    if init == "keep":
        raise ValueError("init='keep' keeps an existing nn.Linear's weights: use sparsify(model, init='keep'); "
                         f"a new layer takes one of {', '.join(INITS)}")
    raise ValueError(f"unknown init {init!r}; valid: {', '.join(INITS)}")


class SparseLayer(nn.Module):
    """What the Rewirer needs of a sparse layer, whatever its kind (linear or convolution).

    The layer's weight is seen as a matrix ``[n_out, n_in]``: for a linear layer that is its
    weight; for a convolution, ``weight.reshape(out_channels, -1)``, so ``n_in`` is
    ``in_channels/groups · kernel positions`` and column ``c · kernel_positions + p`` is input
    channel ``c`` at kernel position ``p``. A *connection* is one entry of that matrix; its key
    is ``row * n_in + col`` (the flat index into the weight). Input *nodes* are the
    ``n_in // kernel_positions`` input features or channels.

    Invariants (checked by :meth:`check`): ``keys()`` is sorted, unique and in range; the
    values line up with it; on ``masked`` every weight outside the mask is exactly 0.
    """

    backend: str = ""
    kernel_positions: int = 1  # matrix columns per input node (1 for a linear layer)

    n_in: int
    n_out: int

    @property
    def nnz(self) -> int:
        """Number of connections."""
        return int(self.connection_values().numel())

    @property
    def density(self) -> float:
        return self.nnz / (self.n_in * self.n_out)

    @property
    def input_nodes(self) -> int:
        """Input features (linear) or input channels per group (convolution)."""
        return self.n_in // self.kernel_positions

    def edge_index(self) -> torch.Tensor:
        """``LongTensor[2, nnz]``: row 0 output neuron, row 1 matrix column, sorted row-major."""
        return keys_to_edge_index(self.keys(), self.n_in)

    def input_node_degree(self) -> torch.Tensor:
        """``[input_nodes]``: connections leaving each input feature or channel (CPU)."""
        cols = self.edge_index()[1].cpu() // self.kernel_positions
        return torch.bincount(cols, minlength=self.input_nodes)

    def check(self) -> None:
        """Raise :class:`~synthprune.topology.TopologyError` if an invariant is broken."""
        check_topology(self.keys(), self.n_out, self.n_in)

    def weight_gradient(self, inputs: torch.Tensor, grad_outputs: torch.Tensor) -> torch.Tensor | None:
        """``[n_out, n_in]`` dense ``∂L/∂W`` from the layer's captured input and output
        gradient, for gradient-based growth; ``None`` when the grower should form it from
        ``inputs``/``grad_outputs`` itself (a linear layer: in bounded chunks)."""
        return None

    def keys(self) -> torch.Tensor:
        """``LongTensor[nnz]``: sorted connection keys ``row * n_in + col``."""
        raise NotImplementedError

    def connection_values(self) -> torch.Tensor:
        """``[nnz]`` connection weights in key order (a view for csr, a gather for masked)."""
        raise NotImplementedError

    def connection_parameter(self) -> nn.Parameter:
        """The Parameter that holds the connection weights (its optimizer state is rewired)."""
        raise NotImplementedError

    def set_connections(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Replace the topology: ``keys`` sorted unique ``[nnz']``, ``values`` ``[nnz']``.

        The connection Parameter keeps its identity (the optimizer still holds it); its data
        is replaced."""
        raise NotImplementedError

    def carry_over(self, old: torch.Tensor, kept_old: torch.Tensor, kept_new: torch.Tensor) -> torch.Tensor:
        """Map a Parameter-shaped tensor (e.g. momentum) from the previous topology to the
        current one: entries of surviving connections move from position ``kept_old`` to
        ``kept_new`` (positions in key order); every other entry is 0."""
        raise NotImplementedError

    def _validate(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        if values.shape != keys.shape:
            raise ValueError(f"values {tuple(values.shape)} must match keys {tuple(keys.shape)}")
        check_topology(keys, self.n_out, self.n_in)


class SparseLinear(SparseLayer):
    """``y = x Wᵀ + b`` with a sparse ``W`` of shape ``[out_features, in_features]``.

    ``SparseLinear(784, 1000, epsilon=20, backend="csr")`` returns the backend's subclass. The
    initial topology is uniformly random with an exact connection count, from one of
    ``epsilon`` (Erdős–Rényi, ``ε·(n_in+n_out)``; the default, ε = 20), ``density`` or
    ``connections``. Inputs are ``[..., in_features]``, outputs ``[..., out_features]``.
    The rewirable interface and its invariants are :class:`SparseLayer`'s.
    """

    def __new__(cls, *args, backend: str = "csr", **kwargs):
        if cls is SparseLinear:
            cls = {"csr": CSRLinear, "masked": MaskedLinear}[check_backend(backend)]
        return super().__new__(cls)

    n_in = property(lambda self: self.in_features)
    n_out = property(lambda self: self.out_features)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        epsilon: float | None = None,
        density: float | None = None,
        connections: int | None = None,
        bias: bool = True,
        backend: str | None = None,
        init: str = "sparse_kaiming",
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if backend is not None and check_backend(backend) != self.backend:
            raise ValueError(f"{type(self).__name__} is the {self.backend!r} backend, not {backend!r}")
        if in_features < 1 or out_features < 1:
            raise ValueError(f"layer sizes must be >= 1, got in={in_features}, out={out_features}")
        self.in_features, self.out_features = int(in_features), int(out_features)
        dtype = dtype or torch.get_default_dtype()
        count = resolve_count(in_features, out_features, epsilon, density, connections)
        keys = random_keys(in_features * out_features, count, generator or torch.default_generator)
        values, bias_values = initial_values(init, count, in_features, out_features, generator, dtype)
        self.bias = nn.Parameter(bias_values.to(device)) if bias else None
        self._allocate(keys.to(device), values.to(device))

    # ---- shared by both backends ------------------------------------------------------

    def to_backend(self, backend: str) -> SparseLinear:
        """A copy of this layer (same topology, values, bias, device) on another backend."""
        layer = SparseLinear(
            self.in_features, self.out_features, connections=1, bias=self.bias is not None,
            backend=backend, generator=torch.Generator(), device=self.connection_values().device,
            dtype=self.connection_values().dtype,
        )
        with torch.no_grad():
            layer.set_connections(self.keys(), self.connection_values().detach().clone())
            if self.bias is not None:
                layer.bias.copy_(self.bias)
        return layer

    def to_dense(self) -> nn.Linear:
        """An ``nn.Linear`` with the same function (absent connections are 0)."""
        values = self.connection_values()
        dense = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                          device=values.device, dtype=values.dtype)
        with torch.no_grad():
            dense.weight.zero_().view(-1)[self.keys()] = values
            if self.bias is not None:
                dense.bias.copy_(self.bias)
        return dense

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"nnz={self.nnz}, density={self.density:.2%}, bias={self.bias is not None}")

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"{type(self).__name__} expects inputs [..., {self.in_features}], "
                             f"got shape {tuple(x.shape)}")


class DenseLinear(nn.Linear):
    """An ``nn.Linear`` (same parameters, same state dict) that is also fast on inputs in the
    transposed layout the csr backend produces: a ``[B, n]`` view of a contiguous ``[n, B]``.
    On such inputs ``F.linear`` takes a CPU path ~6× slower than ``(W xᵀ)ᵀ`` (measured here,
    1000 → 10 at batch 128: 254 µs against 40 µs), so the reference MLP's dense output layer
    cost more than its sparse layers. A narrow layer (at most :data:`NARROW_OUTPUTS` outputs)
    takes the fast kernel's ``narrow_linear`` where it applies, which returns a row-major
    ``[B, n_out]`` (the layout the loss reads fastest) and the input gradient batch-minor.
    Row-major inputs take ``F.linear`` as before."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and x.shape[0] > 1 and x.stride(0) == 1 and x.stride(1) == x.shape[0]:
            x_t = x.t()  # [n_in, B], contiguous
            fast = self._narrow_kernel(x)
            if fast is not None:
                if not _wants_grad(x, self.weight, self.bias):
                    return fast.narrow_linear(self.weight, x_t, self.bias)
                return _NarrowLinearFunction.apply(x_t, self.weight, self.bias, fast)
            if self.bias is None:
                return torch.mm(self.weight, x_t).t()
            return torch.addmm(self.bias.unsqueeze(1), self.weight, x_t).t()
        return F.linear(x, self.weight, self.bias)

    def _narrow_kernel(self, x: torch.Tensor):
        """The fast kernel's ops if ``narrow_linear`` applies to ``x`` (a batch-minor view),
        else ``None``: few outputs, one dtype, no autocast, no tracing or export."""
        weight = self.weight
        if (self.out_features > NARROW_OUTPUTS or x.dtype != weight.dtype or not weight.is_contiguous()
                or (self.bias is not None and (self.bias.dtype != weight.dtype or not self.bias.is_contiguous()))
                or _exporting() or torch.jit.is_tracing() or _autocast_dtype(x.device.type) is not None):
            return None
        return csr_kernel.usable(x, weight)


# Output counts up to which DenseLinear takes the kernel's narrow_linear on batch-minor inputs:
# its register blocks are for a few outputs (measured at 10: 18 against 91 µs forward); wider
# layers are MKL's strength.
NARROW_OUTPUTS = 32


class _NarrowLinearFunction(torch.autograd.Function):
    """``x Wᵀ + b`` of :class:`DenseLinear` from ``x_t`` ``[n_in, B]`` (contiguous), as a
    row-major ``[B, n_out]``; the backward gives the input gradient ``[n_in, B]``, which
    autograd hands to the csr layer before as the batch-minor view it wants."""

    @staticmethod
    def forward(ctx, x_t, weight, bias, fast):
        ctx.save_for_backward(x_t, weight)
        ctx.fast = fast
        return fast.narrow_linear(weight, x_t, bias)

    @staticmethod
    def backward(ctx, grad):
        x_t, weight = ctx.saved_tensors
        needs = [bool(n) for n in ctx.needs_input_grad[:3]]  # a missing bias never needs one
        grads = ctx.fast.narrow_linear_backward(weight, grad.contiguous(), x_t, *needs)
        return (*(g if n else None for g, n in zip(grads, needs, strict=True)), None)


class _CSRLinearFunction(torch.autograd.Function):
    """``y = x Wᵀ + b`` with ``W`` given as CSR parts; gradients for ``x``, the values and ``b``.

    Two paths compute it (``csr_kernel``): synthprune's C++ kernels on CPU where they built
    (forward ``csr_spmm`` with the bias; backward ``csr_backward``, both gradients in one pass),
    else ``torch.sparse``. They agree to float rounding.

    Layout: both want the dense operand row-major, i.e. ``xᵀ`` as a contiguous ``[n_in, B]``,
    so that a connection touches B contiguous values. The output is returned as the transposed
    view of a contiguous ``[n_out, B]``, and elementwise layers keep that layout, so the next
    sparse layer's ``xᵀ`` is contiguous for free; only the network's own input is copied, once
    for forward and backward. On the torch.sparse path, ``addmm`` writes the bias (or nothing,
    ``beta=0``) straight into the output: ``torch.sparse.mm`` would zero-fill it and copy it
    before the product, and the bias add would be a third pass over an activation-sized tensor.
    """

    @staticmethod
    def forward(ctx, x, values, bias, crow, col, t_crow, t_col, t_perm, n_out, n_in):
        ctx.fast = csr_kernel.usable(x, values)
        x_t = _batch_minor(ctx.fast, x)  # [n_in, B]; a no-op for activations from a previous sparse layer
        ctx.save_for_backward(x_t, values, crow, col, t_crow, t_col, t_perm)
        ctx.shape = (n_out, n_in)
        return _csr_forward(ctx.fast, x_t, values, bias, crow, col, n_out, n_in)

    @staticmethod
    def backward(ctx, grad_out):
        x_t, values, crow, col, t_crow, t_col, t_perm = ctx.saved_tensors
        n_out, n_in = ctx.shape
        grad_t = grad_out.t()  # [n_out, B]
        grad_x = grad_values = grad_bias = None
        if ctx.fast is not None:
            return (*_fast_backward(ctx.fast, ctx.needs_input_grad, grad_t.contiguous(), x_t, values,
                                    t_crow, t_col, t_perm), None, None, None, None, None, None, None)
        if ctx.needs_input_grad[0]:  # dL/dx = dL/dy · W, via the cached transpose Wᵀ in CSR
            weight_t = torch.sparse_csr_tensor(t_crow, t_col, values[t_perm], (n_in, n_out), check_invariants=False)
            grad_x = _product_into_new(weight_t, grad_t).t()
        if ctx.needs_input_grad[1]:  # dL/dW only at the connections: (dL/dyᵀ · x) sampled
            pattern = torch.sparse_csr_tensor(crow, col, values.detach(), (n_out, n_in), check_invariants=False)
            grad_values = torch.sparse.sampled_addmm(pattern, grad_t, x_t.t(), beta=0.0).values()
        if ctx.needs_input_grad[2]:
            grad_bias = grad_out.sum(0)
        return grad_x, grad_values, grad_bias, None, None, None, None, None, None, None


class _CSRReLUFunction(torch.autograd.Function):
    """``dropout(relu(x Wᵀ + b), p)`` (``p = 0``: no dropout) in one forward and one backward
    pass over the activations, fast path only (:meth:`CSRLinear.relu_dropout`). The same
    results, bit for bit, and the same dropout masks as the layer, ``nn.ReLU`` and
    :class:`Dropout` one after the other; saves the output, which the next layer saves anyway
    as its input, so it costs no memory."""

    @staticmethod
    def forward(ctx, x, values, bias, crow, col, t_crow, t_col, t_perm, fast, p, seed):
        x_t = _batch_minor(fast, x)
        y_t = fast.csr_spmm_relu(crow, col, values, x_t, bias, p, seed)
        ctx.save_for_backward(x_t, values, y_t, t_crow, t_col, t_perm)
        ctx.fast, ctx.p = fast, p
        return y_t.t()

    @staticmethod
    def backward(ctx, grad_out):
        x_t, values, y_t, t_crow, t_col, t_perm = ctx.saved_tensors
        needs = ctx.needs_input_grad
        grad_z, bias_sums = ctx.fast.relu_dropout_backward(grad_out.t().contiguous(), y_t, ctx.p, bool(needs[2]))
        grad_x, grad_values, _ = _fast_backward(ctx.fast, (needs[0], needs[1], False), grad_z, x_t, values,
                                                t_crow, t_col, t_perm)
        return (grad_x, grad_values, bias_sums if needs[2] else None, *[None] * 8)


def _batch_minor(fast, x: torch.Tensor) -> torch.Tensor:
    """``x.t().contiguous()``: ``[n_in, B]`` from ``[B, n_in]``. Free for activations from a
    previous csr layer (already the transposed view of a contiguous tensor); the network's own
    input goes through the kernel's tiled transpose where it can (42-66 against 12 µs for a
    128 × 784 batch; the strided copy touches a cache line per element)."""
    if fast is not None and x.is_contiguous() and x.dim() == 2 and x.shape[0] > 1 and x.shape[1] > 1:
        return fast.batch_minor(x)
    return x.t().contiguous()


def _csr_forward(fast, x_t, values, bias, crow, col, n_out: int, n_in: int) -> torch.Tensor:
    """``y = x Wᵀ + b`` as the transposed view of a contiguous ``[n_out, B]``, from ``x_t``
    ``[n_in, B]``: the fast kernel's ops when given, else ``torch.sparse``."""
    if fast is not None:
        return fast.csr_spmm(crow, col, values, None, x_t, bias).t()
    weight = torch.sparse_csr_tensor(crow, col, values, (n_out, n_in), check_invariants=False)
    y_t = _product_into_new(weight, x_t) if bias is None else torch.addmm(bias.unsqueeze(1), weight, x_t)
    return y_t.t()


def _fast_backward(fast, needs, grad_t, x_t, values, t_crow, t_col, t_perm):
    """(dL/dx, dL/dvalues, dL/dbias) with the C++ kernels. The value gradient comes from one
    pass over Wᵀ, which also computes the input gradient when it is wanted (each gradient row
    is fetched once, not twice) and sums the bias gradient; an input gradient alone is the
    forward product with Wᵀ."""
    if needs[1]:
        grad_x_t, grad_values, bias_sums = fast.csr_backward(t_crow, t_col, t_perm, values, grad_t, x_t,
                                                              bool(needs[2]), bool(needs[0]))
        return grad_x_t.t() if needs[0] else None, grad_values, bias_sums if needs[2] else None
    grad_x = fast.csr_spmm(t_crow, t_col, values, t_perm, grad_t, None).t() if needs[0] else None
    return grad_x, None, grad_t.sum(1) if needs[2] else None


_PRODUCT_DTYPES = (torch.float32, torch.float64)


def _exporting() -> bool:
    """Whether torch.export is tracing (torch >= 2.5 can tell)."""
    check = getattr(torch.compiler, "is_exporting", None)
    return bool(check and check())


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast computes in on ``device_type``, or ``None`` outside autocast."""
    try:
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
    except TypeError:  # torch < 2.4: no device argument
        if device_type == "cpu" and torch.is_autocast_cpu_enabled():
            return torch.get_autocast_cpu_dtype()
        if device_type == "cuda" and torch.is_autocast_enabled():
            return torch.get_autocast_gpu_dtype()
    return None


def _product_into_new(sparse: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    """``sparse @ dense`` into fresh memory: ``addmm`` with ``beta=0`` ignores its input (NaN
    included), and giving the same tensor as ``out`` spares the copy of the input into the
    result that ``torch.sparse.mm`` and a plain ``addmm`` both make."""
    result = dense.new_empty(sparse.shape[0], dense.shape[1])
    return torch.addmm(result, sparse, dense, beta=0.0, out=result)


class CSRLinear(SparseLinear):
    """Truly sparse backend: memory and time scale with ``nnz``, never with ``n_out · n_in``."""

    backend = "csr"

    def _allocate(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.values = nn.Parameter(values)
        self.register_buffer("crow_indices", torch.zeros(self.out_features + 1, dtype=torch.long, device=keys.device))
        self.register_buffer("col_indices", keys % self.in_features)
        # Derived index structures: rebuilt only when the topology changes, not per step.
        for name in ("_rows", "_crow", "_col", "_t_crow", "_t_col", "_t_perm"):
            self.register_buffer(name, torch.empty(0, dtype=torch.long, device=keys.device), persistent=False)
        self._index_from_keys(keys)

    def _index_from_keys(self, keys: torch.Tensor) -> None:
        rows, cols = keys // self.in_features, keys % self.in_features
        self.crow_indices = _crow_from_sorted_rows(rows, self.out_features)
        self.col_indices = cols
        self._rebuild_cache(rows)

    def _rebuild_cache(self, rows: torch.Tensor | None = None) -> None:
        if rows is None:
            counts = self.crow_indices.diff()
            rows = torch.repeat_interleave(torch.arange(self.out_features, device=counts.device), counts)
        self._rows = rows
        # The products take 32-bit indices where they fit: MKL's are 32-bit, and given 64-bit
        # ones PyTorch converts them on every call (a third of a 16,000-wide MLP's step).
        fits = max(self.nnz, self.in_features, self.out_features) < 2**31 - 1
        index_dtype = torch.int32 if fits else torch.long
        self._crow, self._col = self.crow_indices.to(index_dtype), self.col_indices.to(index_dtype)
        # The transpose Wᵀ (CSC order of W): permutation from CSR order, and its CSR indices.
        # Rows are sorted, so a stable sort by column gives (column, row) order.
        perm = torch.sort(self.col_indices, stable=True).indices
        self._t_col = rows[perm].to(index_dtype)
        self._t_crow = _crow_from_sorted_rows(self.col_indices[perm], self.in_features).to(index_dtype)
        self._t_perm = perm.to(index_dtype)  # 32-bit too: the backward reads it once per connection

    def keys(self) -> torch.Tensor:
        return self._rows * self.in_features + self.col_indices

    def connection_values(self) -> torch.Tensor:
        return self.values

    def connection_parameter(self) -> nn.Parameter:
        return self.values

    def set_connections(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        device = self.values.device
        keys, values = keys.to(device), values.to(device, self.values.dtype)
        self._validate(keys, values)
        if values.shape == self.values.shape:
            self.values.data = values
        else:
            # A new size: autograd caches the leaf's shape in its gradient accumulator, which a
            # graph still alive in the caller's loop (last batch's loss) keeps; `.data = ...`
            # would leave it stale and the next backward would fail. Swapping in a fresh
            # tensor keeps the Parameter object (the optimizer's key) and drops the cache.
            fresh = nn.Parameter(values, requires_grad=self.values.requires_grad)
            try:
                torch.utils.swap_tensors(self.values, fresh)
            except RuntimeError as exc:
                raise RuntimeError(
                    f"cannot resize this layer's connections ({exc}): something else holds them. Under "
                    "DistributedDataParallel, rewire with `ddp, reports = synthprune.rewire_ddp(ddp, rewirer)`, "
                    "which rebuilds the wrapper") from None
        self._index_from_keys(keys)

    def carry_over(self, old: torch.Tensor, kept_old: torch.Tensor, kept_new: torch.Tensor) -> torch.Tensor:
        new = old.new_zeros(self.nnz)
        new[kept_new.to(old.device)] = old[kept_old.to(old.device)]
        return new

    def check(self) -> None:
        super().check()
        crow = self.crow_indices
        if crow.numel() != self.out_features + 1 or int(crow[0]) != 0 or int(crow[-1]) != self.nnz:
            raise TopologyError("csr row pointers do not match the number of connections")
        if self.col_indices.numel() != self.nnz:
            raise TopologyError("csr column indices do not match the number of connections")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        flat = x.reshape(-1, self.in_features)
        values, bias = self.values, self.bias
        # The sparse products (MKL on CPU) take float32/float64 only, and autocast would cast
        # their operands to bf16/fp16 inside the function. Half-precision models and autocast
        # regions therefore compute this layer in float32 and return the precision the caller
        # expects: the autocast dtype inside autocast (as nn.Linear does), else the layer's.
        low = _autocast_dtype(x.device.type)
        if low is not None or values.dtype not in _PRODUCT_DTYPES or x.dtype != values.dtype:
            compute = values.dtype if values.dtype in _PRODUCT_DTYPES else torch.float32
            flat, values = flat.to(compute), values.to(compute)
            bias = bias.to(compute) if bias is not None else None
            with torch.autocast(x.device.type, enabled=False):
                y = self._product(flat, values, bias)
            y = y.to(low or self.values.dtype)
        else:
            y = self._product(flat, values, bias)
        return y.reshape(*x.shape[:-1], self.out_features)

    def _product(self, flat: torch.Tensor, values: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if _exporting() and csr_kernel.usable(flat, values) is None:
            # torch.sparse's CSR tensors cannot be traced by torch.export (it fails deep inside
            # with "Values and compressed tensor instance need to be on the same device").
            raise RuntimeError(
                f"torch.export cannot trace a csr layer on the torch.sparse path (csr path: "
                f"{csr_kernel.describe()}). Use the fast csr kernel, or export a dense copy: "
                "residual_network(model, form='dense'), or synthprune.export_onnx(model, path)")
        if not _wants_grad(flat, values, bias):  # inference: the product without autograd
            fast = csr_kernel.usable(flat, values)
            return _csr_forward(fast, _batch_minor(fast, flat), values, bias, self._crow, self._col,
                                self.out_features, self.in_features)
        return _CSRLinearFunction.apply(
            flat, values, bias, self._crow, self._col,
            self._t_crow, self._t_col, self._t_perm, self.out_features, self.in_features,
        )

    def relu_dropout(self, x: torch.Tensor, p: float) -> torch.Tensor | None:
        """``dropout(relu(self(x)), p)`` as one fused op (``p = 0``: no dropout, an inference or
        ``eval()`` pass), drawing its dropout seed as :class:`Dropout` does; ``None`` where the
        fast kernel does not apply (then run the modules one by one). What
        :class:`~synthprune.models.SparseMLP` calls for each ``fc → ReLU → Dropout``."""
        values, bias = self.values, self.bias
        if (x.dim() != 2 or x.shape[1] != self.in_features or x.dtype != values.dtype or _exporting()
                or _autocast_dtype(x.device.type) is not None or values.dtype not in _PRODUCT_DTYPES):
            return None
        fast = csr_kernel.usable(x, values)
        if fast is None:
            return None
        seed = _dropout_seed() if p > 0 else 0
        if not _wants_grad(x, values, bias):
            return fast.csr_spmm_relu(self._crow, self._col, values, _batch_minor(fast, x), bias, p, seed).t()
        return _CSRReLUFunction.apply(x, values, bias, self._crow, self._col, self._t_crow, self._t_col,
                                      self._t_perm, fast, p, seed)

    def _consistent(self, values: torch.Tensor, cols: torch.Tensor, crow: torch.Tensor) -> bool:
        """Whether stored csr tensors can be this layer's: matching lengths, row pointers from 0
        to nnz without going back, columns in range."""
        return (values.dim() == 1 and values.shape == cols.shape and crow.shape == (self.out_features + 1,)
                and int(crow[0]) == 0 and int(crow[-1]) == values.numel() and not bool((crow.diff() < 0).any())
                and (cols.numel() == 0 or 0 <= int(cols.min()) <= int(cols.max()) < self.in_features))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The stored topology may have a different nnz: resize before PyTorch copies into place.
        values, cols = state_dict.get(prefix + "values"), state_dict.get(prefix + "col_indices")
        crow = state_dict.get(prefix + "crow_indices")
        complete = values is not None and cols is not None and crow is not None
        # Checked before anything is copied: a short `values` would otherwise load and give NaN.
        if complete and not self._consistent(values, cols, crow):
            raise ValueError(f"{prefix or 'layer'}: inconsistent csr tensors (values {tuple(values.shape)}, "
                             f"col_indices {tuple(cols.shape)}, crow_indices {tuple(crow.shape)} ending at "
                             f"{int(crow[-1]) if crow.numel() else None}) for a {self.out_features}x"
                             f"{self.in_features} layer")
        if values is not None and values.shape != self.values.shape:
            self.values.data = self.values.data.new_empty(values.shape)
        if cols is not None and cols.shape != self.col_indices.shape:
            self.col_indices = self.col_indices.new_empty(cols.shape)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._rebuild_cache()
        if complete:
            try:
                self.check()
            except TopologyError as exc:
                raise ValueError(f"{prefix or 'layer'}: the loaded wiring is invalid ({exc})") from None


class MaskedConnections(SparseLayer):
    """The masked storage every masked layer shares (linear or convolution): a dense
    ``weight`` Parameter and a persistent boolean ``mask`` of the same shape; absent weights
    are kept at exactly 0. A key is the flat index into ``weight``."""

    backend = "masked"
    weight: nn.Parameter
    mask: torch.Tensor

    def keys(self) -> torch.Tensor:
        return self.mask.view(-1).nonzero().squeeze(1)

    def connection_values(self) -> torch.Tensor:
        return self.weight.view(-1)[self.keys()]

    def connection_parameter(self) -> nn.Parameter:
        return self.weight

    def set_connections(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        device = self.weight.device
        keys, values = keys.to(device), values.to(device, self.weight.dtype)
        self._validate(keys, values)
        self.mask.zero_().view(-1)[keys] = True
        self.weight.data.zero_().view(-1)[keys] = values

    def carry_over(self, old: torch.Tensor, kept_old: torch.Tensor, kept_new: torch.Tensor) -> torch.Tensor:
        flat = self.keys()[kept_new.to(old.device)]
        new = torch.zeros_like(old)
        new.view(-1)[flat] = old.view(-1)[flat]
        return new

    def check(self) -> None:
        super().check()
        if bool((self.weight.detach()[~self.mask] != 0).any()):
            raise TopologyError(f"{type(self).__name__} has non-zero weights outside its mask")


class MaskedLinear(MaskedConnections, SparseLinear):
    """Dense weight × boolean mask. Absent weights are kept at exactly 0."""

    def _allocate(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        shape = (self.out_features, self.in_features)
        self.weight = nn.Parameter(values.new_zeros(shape))
        self.register_buffer("mask", torch.zeros(shape, dtype=torch.bool, device=keys.device))
        with torch.no_grad():
            self.set_connections(keys, values)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        return F.linear(x, self.weight * self.mask, self.bias)


class _DropoutFunction(torch.autograd.Function):
    """Dropout with the kernel's hashed mask: the same op on the output's gradient (same seed,
    same memory layout) is the backward, so no mask is stored."""

    @staticmethod
    def forward(ctx, x, p, seed, fast):
        ctx.p, ctx.seed, ctx.fast, ctx.stride = p, seed, fast, x.stride()
        return fast.dropout(x, p, seed)

    @staticmethod
    def backward(ctx, grad):
        if grad.stride() != ctx.stride:  # the mask is indexed by memory offset: match the forward's layout
            grad = grad.new_empty_strided(grad.shape, ctx.stride).copy_(grad)
        return ctx.fast.dropout(grad, ctx.p, ctx.seed), None, None, None


class Dropout(nn.Dropout):
    """``nn.Dropout`` (same arguments, same behaviour in distribution) whose mask costs less on
    CPU: a hash of (seed, position) in the fast kernel (``csr_kernel``) instead of one
    Bernoulli draw per element. On the reference MLP, ``nn.Dropout`` took 1.5 ms of a 12 ms
    training step per layer. The seed is one draw from torch's default generator per call, so
    ``torch.manual_seed`` and resume reproduce the masks; they differ from ``nn.Dropout``'s.
    Elsewhere (GPU, no kernel, ``inplace``, strided inputs) it is ``nn.Dropout``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and 0 < self.p < 1 and not self.inplace and _dense_in_memory(x):
            fast = csr_kernel.usable(x)
            if fast is not None:
                return _DropoutFunction.apply(x, self.p, _dropout_seed(), fast)
        return super().forward(x)


def _wants_grad(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd must record an op on ``tensors`` (``None``: an absent bias): grad mode
    is on and one of them requires a gradient. Otherwise the layers call their kernels directly,
    without autograd's bookkeeping (~30 µs a call)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _dropout_seed() -> int:
    """The seed of one dropout mask: one draw from torch's default generator."""
    return int(torch.randint(-2**63, 2**63 - 1, (1,), dtype=torch.long))


def _dense_in_memory(x: torch.Tensor) -> bool:
    """Contiguous, or the transposed view of a contiguous matrix (the csr layers' output)."""
    return x.is_contiguous() or (x.dim() == 2 and x.t().is_contiguous())


def keep_dense_weights(layer: SparseLayer, dense: nn.Module) -> SparseLayer:
    """Give ``layer`` the weights (and bias) that ``dense`` (an ``nn.Linear`` or ``nn.ConvNd``
    of the same shape) has at ``layer``'s connections: ``sparsify(..., init="keep")``."""
    with torch.no_grad():
        keys = layer.keys()
        layer.set_connections(keys, dense.weight.detach().reshape(-1)[keys].clone())
        if dense.bias is not None:
            layer.bias.copy_(dense.bias)
    return layer


def _crow_from_sorted_rows(rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    """CSR row pointers ``[n_rows + 1]`` from the (sorted) row index of each connection."""
    crow = torch.zeros(n_rows + 1, dtype=torch.long, device=rows.device)
    crow[1:] = torch.bincount(rows, minlength=n_rows).cumsum(0)
    return crow
