"""The csr layer's fast CPU kernels: the same products as torch.sparse and dense algebra, to
float rounding, at every shape, batch, dtype and index width; the policy switch and its
fallback; and the layer's gradients through them."""

import os

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from synthprune import SparseLinear, SparseMLP, csr_kernel
from synthprune.layers import CSRLinear


def fast_ops():
    """The kernel ops; a test that needs them fails in CI rather than skip (CI has a compiler),
    unless the fast path was switched off on purpose (SYNTHPRUNE_CSR_KERNEL=torch: the suite's
    run without it)."""
    if csr_kernel.policy() == "torch":
        pytest.skip(f"{csr_kernel.ENV}=torch: the fast path is switched off")
    found = csr_kernel.ops()
    if found is None:
        if os.environ.get("CI"):
            pytest.fail(f"the fast csr kernel should build in CI: {csr_kernel.describe()}")
        pytest.skip(f"fast csr kernel unavailable: {csr_kernel.describe()}")
    return found


def layer(n_in, n_out, density, seed, dtype=torch.float32) -> CSRLinear:
    made = SparseLinear(n_in, n_out, density=density, generator=torch.Generator().manual_seed(seed))
    made.bias.data.normal_(generator=torch.Generator().manual_seed(seed + 7))
    return made.to(dtype)


@given(n_in=st.integers(1, 70), n_out=st.integers(1, 70), density=st.floats(0.01, 1.0),
       batch=st.sampled_from([0, 1, 3, 8, 31, 64, 65, 130]), seed=st.integers(0, 10_000),
       dtype=st.sampled_from([torch.float32, torch.float64]), wide_index=st.booleans())
def test_kernels_equal_dense_algebra(n_in, n_out, density, batch, seed, dtype, wide_index):
    ops = fast_ops()
    sparse = layer(n_in, n_out, density, seed, dtype)
    weight = sparse.to_dense().weight.detach()  # [n_out, n_in]
    index = torch.long if wide_index else torch.int32
    crow, col = sparse._crow.to(index), sparse._col.to(index)
    t_crow, t_col, t_perm = sparse._t_crow.to(index), sparse._t_col.to(index), sparse._t_perm.to(index)
    values, bias = sparse.values.detach(), sparse.bias.detach()
    gen = torch.Generator().manual_seed(seed + 1)
    x_t = torch.randn(n_in, batch, generator=gen, dtype=dtype)
    g_t = torch.randn(n_out, batch, generator=gen, dtype=dtype)
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-12, "rtol": 1e-12}

    torch.testing.assert_close(ops.csr_spmm(crow, col, values, None, x_t, bias), weight @ x_t + bias[:, None], **tol)
    torch.testing.assert_close(ops.csr_spmm(crow, col, values, None, x_t, None), weight @ x_t, **tol)
    torch.testing.assert_close(ops.csr_spmm(t_crow, t_col, values, t_perm, g_t, None), weight.t() @ g_t,
                               **tol)
    value_grads = (g_t @ x_t.t()).reshape(-1)[sparse.keys()]
    fused_x, fused_values, fused_bias = ops.csr_backward(t_crow, t_col, t_perm, values, g_t, x_t, True)
    torch.testing.assert_close(fused_x, weight.t() @ g_t, **tol)
    torch.testing.assert_close(fused_values, value_grads, **tol)
    torch.testing.assert_close(fused_bias, g_t.sum(1), **tol)
    assert ops.csr_backward(t_crow, t_col, t_perm, values, g_t, x_t, False)[2].numel() == 0
    # Without the input gradient (a first layer): the value gradient alone, no input gradient.
    no_x, alone_values, alone_bias = ops.csr_backward(t_crow, t_col, t_perm, values, g_t, x_t, True, False)
    assert no_x.numel() == 0
    torch.testing.assert_close(alone_values, value_grads, **tol)
    torch.testing.assert_close(alone_bias, g_t.sum(1), **tol)


def test_kernels_reject_what_they_cannot_compute():
    ops = fast_ops()
    sparse = layer(10, 8, 0.5, 0)
    x_t = torch.randn(10, 4)
    with pytest.raises(RuntimeError, match="x_t must be a contiguous"):
        ops.csr_spmm(sparse._crow, sparse._col, sparse.values.detach(), None, x_t.t().contiguous().t(), None)
    with pytest.raises(RuntimeError, match="int32 or both int64"):
        ops.csr_spmm(sparse._crow, sparse._col.long(), sparse.values.detach(), None, x_t, None)


@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck_through_the_kernels(bias):  # the fused backward (input and values wanted)
    fast_ops()
    sparse = SparseLinear(9, 7, density=0.4, bias=bias, generator=torch.Generator().manual_seed(3)).double()
    x = torch.randn(5, 9, dtype=torch.float64, requires_grad=True)
    params = (sparse.values, sparse.bias) if bias else (sparse.values,)
    assert torch.autograd.gradcheck(lambda x, *p: sparse(x), (x, *params))
    # and the separate kernels: the input gradient alone, the value gradient alone
    assert torch.autograd.gradcheck(lambda x: sparse(x), (x,))
    assert torch.autograd.gradcheck(lambda *p: sparse(x.detach()), params)


def run_mlp(seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Loss and gradients of a small csr MLP on a fixed batch (a batch size that is not a
    multiple of the kernels' register block)."""
    torch.manual_seed(seed)
    model = SparseMLP([20, 30, 25, 5], epsilon=3, backend="csr")
    x = torch.randn(70, 20)
    loss = torch.nn.functional.cross_entropy(model(x), torch.arange(70) % 5)
    loss.backward()
    return loss.detach(), [p.grad for p in model.parameters()]


def test_fast_and_torch_sparse_paths_agree(monkeypatch):
    fast_ops()
    loss_fast, grads_fast = run_mlp(0)
    monkeypatch.setenv(csr_kernel.ENV, "torch")
    assert csr_kernel.ops() is None
    loss_torch, grads_torch = run_mlp(0)
    torch.testing.assert_close(loss_fast, loss_torch)
    for fast, reference in zip(grads_fast, grads_torch, strict=True):
        torch.testing.assert_close(fast, reference, atol=1e-6, rtol=1e-5)


def test_policy_torch_describes_the_fallback(monkeypatch):
    monkeypatch.setenv(csr_kernel.ENV, "torch")
    assert csr_kernel.ops() is None
    assert csr_kernel.describe() == f"torch.sparse ({csr_kernel.ENV}=torch)"


def test_a_bad_policy_is_named(monkeypatch):
    monkeypatch.setenv(csr_kernel.ENV, "fastest")
    with pytest.raises(csr_kernel.KernelUnavailable, match="SYNTHPRUNE_CSR_KERNEL='fastest' is not one of"):
        csr_kernel.ops()


def test_a_failed_build_falls_back_under_auto_and_fails_under_fast(monkeypatch):
    def broken():
        raise RuntimeError("Error building extension 'synthprune_csr_avx2'\nlong compiler log")

    monkeypatch.setattr(csr_kernel, "_state", {})
    monkeypatch.setattr(csr_kernel, "_build", broken)
    monkeypatch.setenv(csr_kernel.ENV, "auto")
    assert csr_kernel.ops() is None
    assert csr_kernel.describe() == ("torch.sparse (the fast kernel did not build: "
                                     "Error building extension 'synthprune_csr_avx2')")
    sparse = layer(6, 4, 0.5, 0)  # and the layer still computes, on torch.sparse
    torch.testing.assert_close(sparse(torch.ones(2, 6)), sparse.to_dense()(torch.ones(2, 6)))
    monkeypatch.setenv(csr_kernel.ENV, "fast")
    with pytest.raises(csr_kernel.KernelUnavailable, match="unavailable: Error building extension"):
        csr_kernel.ops()


def test_operands_the_kernel_does_not_take_use_torch_sparse():
    fast_ops()
    assert csr_kernel.usable(torch.ones(2, dtype=torch.bfloat16)) is None
    assert csr_kernel.usable(torch.ones(2, device="meta")) is None
    assert csr_kernel.usable(torch.ones(2), torch.ones(2, dtype=torch.float64)) is not None


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5])
@pytest.mark.parametrize("transposed", [False, True])
def test_dropout_keeps_one_minus_p_scales_and_masks_the_gradient_alike(p, transposed):
    fast_ops()
    from synthprune.layers import Dropout

    torch.manual_seed(0)
    x = torch.randn(400, 256)
    x = (x.t() if transposed else x).clone().requires_grad_()  # the csr layers' output is transposed
    y = Dropout(p)(x)
    kept = y != 0
    n = kept.numel()
    assert abs(kept.float().mean().item() - (1 - p)) < 4 * (p * (1 - p) / n) ** 0.5  # 4 standard deviations
    torch.testing.assert_close(y[kept], x.detach()[kept] / (1 - p))
    weights = torch.randn(y.shape)  # a gradient in the other memory layout than y's
    (y * weights).sum().backward()
    torch.testing.assert_close(x.grad, kept * weights / (1 - p))


def test_dropout_masks_follow_the_seed_not_the_thread_count():
    fast_ops()
    from synthprune.layers import Dropout

    x, before = torch.randn(300, 500), torch.get_num_threads()
    masks = []
    try:
        for threads in (1, 2, 1):
            torch.set_num_threads(threads)
            torch.manual_seed(5)
            masks.append(Dropout(0.3)(x) != 0)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(masks[0], masks[1]) and torch.equal(masks[0], masks[2])
    assert not torch.equal(masks[0], Dropout(0.3)(x) != 0)  # the next call draws another seed


def test_dropout_is_nn_dropout_where_the_kernel_does_not_apply(monkeypatch):
    from synthprune.layers import Dropout

    x = torch.randn(50, 40)
    assert torch.equal(Dropout(0.3).eval()(x), x) and torch.equal(Dropout(0.0)(x), x)
    assert torch.equal(Dropout(1.0)(x), torch.zeros_like(x))
    monkeypatch.setenv(csr_kernel.ENV, "torch")
    torch.manual_seed(1)
    ours = Dropout(0.3)(x)
    torch.manual_seed(1)
    assert torch.equal(ours, torch.nn.functional.dropout(x, 0.3, True))
    assert isinstance(SparseMLP([8, 6, 2], epsilon=1, dropout=0.2).drop1, Dropout)


def test_a_build_killed_midway_does_not_hang_the_next_process(tmp_path):
    """PyTorch's build guard is a lock file that a killed builder leaves behind, after which
    every later load waited forever. A real SIGKILL during a real build; the next process must
    build and load the kernel."""
    import signal
    import subprocess
    import sys
    import time

    fast_ops()
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path), csr_kernel.ENV: "fast"}
    load = [sys.executable, "-c", "from synthprune import csr_kernel; csr_kernel.ops(); print('loaded')"]
    first = subprocess.Popen(load, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob("*/*/lock")) and time.monotonic() < deadline and first.poll() is None:
        time.sleep(0.05)
    assert list(tmp_path.glob("*/*/lock")), "the first process never started building"
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert list(tmp_path.glob("*/*/lock")), "PyTorch's lock file should be left behind by the kill"
    second = subprocess.run(load, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0 and second.stdout.strip() == "loaded", second.stderr[-1500:]


@given(n_in=st.integers(1, 70), n_out=st.integers(1, 70), density=st.floats(0.01, 1.0),
       batch=st.sampled_from([0, 1, 3, 16, 31, 65, 130]), p=st.sampled_from([0.0, 0.1, 0.5]),
       seed=st.integers(0, 10_000), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_fused_relu_dropout_equals_the_separate_ops(n_in, n_out, density, batch, p, seed, dtype):
    # csr_spmm_relu = dropout(relu(product)) with the dropout op's mask, bit for bit; its
    # backward = the gradient through both, with the bias gradient as its row sums.
    ops = fast_ops()
    sparse = layer(n_in, n_out, density, seed, dtype)
    values, bias = sparse.values.detach(), sparse.bias.detach()
    gen = torch.Generator().manual_seed(seed + 1)
    x_t = torch.randn(n_in, batch, generator=gen, dtype=dtype)
    g_t = torch.randn(n_out, batch, generator=gen, dtype=dtype)
    relu = ops.csr_spmm(sparse._crow, sparse._col, values, None, x_t, bias).relu()
    separate = ops.dropout(relu, p, seed) if p > 0 else relu
    fused = ops.csr_spmm_relu(sparse._crow, sparse._col, values, x_t, bias, p, seed)
    assert torch.equal(fused, separate)
    grad_z, bias_grad = ops.relu_dropout_backward(g_t, fused, p, True)
    expected = torch.where(relu > 0, ops.dropout(g_t, p, seed) if p > 0 else g_t, torch.zeros_like(g_t))
    torch.testing.assert_close(grad_z, expected, rtol=0, atol=0)
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-12, "rtol": 1e-12}
    torch.testing.assert_close(bias_grad, expected.sum(1), **tol)
    assert ops.relu_dropout_backward(g_t, fused, p, False)[1].numel() == 0


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sparse_mlp_fuses_its_blocks_bit_for_bit(dropout, dtype):
    # SparseMLP runs csr -> ReLU -> Dropout as one op; a hook on a module turns its block back
    # into separate modules (the hook must see them run). Outputs, gradients and the random
    # state afterwards are the same either way, in training and in eval.
    fast_ops()
    model = SparseMLP([40, 30, 20, 5], epsilon=3, dropout=dropout, seed=0).to(dtype)
    x, y = torch.randn(17, 40, dtype=dtype), torch.randint(0, 5, (17,))
    calls = []

    def run(separate: bool):
        hooks = [getattr(model, f"act{i}").register_forward_hook(lambda *a: calls.append(1)) for i in (1, 2)] \
            if separate else []
        torch.manual_seed(3)
        model.zero_grad(set_to_none=True)
        out = model(x)
        torch.nn.functional.cross_entropy(out, y).backward()
        for hook in hooks:
            hook.remove()
        return out.detach(), [p.grad for p in model.parameters()], torch.get_rng_state()

    fused, separate = run(False), run(True)
    assert len(calls) == 2  # the hooked modules ran
    assert torch.equal(fused[0], separate[0]) and torch.equal(fused[2], separate[2])
    assert all(torch.equal(a, b) for a, b in zip(fused[1], separate[1], strict=True))
    model.eval()
    with torch.no_grad():
        plain = model(x)
        hook = model.act1.register_forward_hook(lambda *a: None)
        assert torch.equal(model(x), plain)
        hook.remove()


def test_gradcheck_through_the_fused_block():
    fast_ops()
    model = SparseMLP([6, 5, 4], epsilon=2, seed=1).double()
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    # kink-free: every pre-activation away from 0, so the ReLU is differentiable there
    with torch.no_grad():
        model.fc1.bias.add_(torch.where(model.fc1(x) >= 0, 0.5, -0.5).mean(0))
    assert torch.autograd.gradcheck(lambda x, v, b: model(x), (x, model.fc1.values, model.fc1.bias))


def test_a_global_module_hook_sees_every_module_of_a_fused_block():
    fast_ops()
    model = SparseMLP([12, 8, 3], epsilon=2, dropout=0.2, seed=0)
    seen = []
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, a, o: seen.append(type(m).__name__))
    try:
        model(torch.randn(4, 12))
    finally:
        handle.remove()
    assert {"CSRLinear", "ReLU", "Dropout"} <= set(seen)


@given(batch=st.integers(1, 40), n=st.integers(1, 40), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_batch_minor_is_the_transpose(batch, n, dtype):
    ops = fast_ops()
    x = torch.randn(batch, n, dtype=dtype)
    assert torch.equal(ops.batch_minor(x), x.t().contiguous())


@given(n_in=st.integers(0, 70), n_out=st.integers(0, 40), batch=st.sampled_from([0, 1, 3, 16, 31, 65, 130]),
       seed=st.integers(0, 10_000), dtype=st.sampled_from([torch.float32, torch.float64]),
       bias=st.booleans(), wants=st.tuples(st.booleans(), st.booleans(), st.booleans()))
def test_narrow_linear_equals_dense_algebra(n_in, n_out, batch, seed, dtype, bias, wants):
    # The narrow dense layer's kernels at every output count (blocks of 1-8, padded or not),
    # batch (register blocks and the scalar tail) and dtype: y = x Wᵀ + b row-major, and the
    # input gradient batch-minor, the weight and bias gradients, each only when asked.
    ops = fast_ops()
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(n_out, n_in, generator=gen, dtype=dtype)
    b = torch.randn(n_out, generator=gen, dtype=dtype) if bias else None
    x_t = torch.randn(n_in, batch, generator=gen, dtype=dtype)
    grad = torch.randn(batch, n_out, generator=gen, dtype=dtype)
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-12, "rtol": 1e-12}
    y = ops.narrow_linear(weight, x_t, b)
    assert y.shape == (batch, n_out) and y.is_contiguous()
    torch.testing.assert_close(y, x_t.t() @ weight.t() + (b if bias else 0), **tol)
    grad_x, grad_w, grad_b = ops.narrow_linear_backward(weight, grad, x_t, *wants)
    if wants[0]:
        torch.testing.assert_close(grad_x, (grad @ weight).t(), **tol)
    if wants[1]:
        torch.testing.assert_close(grad_w, grad.t() @ x_t.t(), **tol)
    if wants[2]:
        torch.testing.assert_close(grad_b, grad.sum(0), **tol)
    assert [t.numel() == 0 for t in (grad_x, grad_w, grad_b)] == [not w or n == 0 for w, n in zip(
        wants, (n_in * batch, n_out * n_in, n_out), strict=True)]


@pytest.mark.parametrize("bias", [True, False])
def test_dense_output_layer_takes_the_narrow_kernel_on_batch_minor_inputs(bias):
    # DenseLinear after a csr layer: the kernel's path, the same results as nn.Linear to float
    # rounding, row-major logits, and an input gradient in the layout the csr layer before wants.
    fast_ops()
    from synthprune.layers import DenseLinear

    torch.manual_seed(0)
    dense = DenseLinear(50, 10, bias=bias).double()
    x = torch.randn(50, 33, dtype=torch.float64).t().requires_grad_()  # the csr layers' layout
    assert dense._narrow_kernel(x) is not None
    y = dense(x)
    assert y.is_contiguous() and type(y.grad_fn).__name__.startswith("_NarrowLinear")
    with csr_kernel.forced("torch"):
        reference = dense(x)
    torch.testing.assert_close(y, reference)
    assert torch.autograd.gradcheck(lambda x, *p: dense(x), (x, *dense.parameters()))
    y.sum().backward()
    assert x.grad.stride() == (1, 33)  # batch-minor: the csr layer's backward copies nothing
    with torch.no_grad():
        torch.testing.assert_close(dense(x), reference)
    wide = DenseLinear(50, 40).double()  # wider layers stay with MKL
    assert wide._narrow_kernel(x) is None
