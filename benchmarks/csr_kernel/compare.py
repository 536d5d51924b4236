"""The csr layer's C++ kernels (src/synthprune/kernels/csr_cpu.cpp) against the torch.sparse
products they replace, one product at a time, on one 1000 -> 1000 layer at ε = 20 (40,000
connections), batch 128, one thread: CPU time per call (median of 50), three rounds, after
checking that both agree to float rounding. The limit column is the product's multiply-adds at
the dense GEMM rate measured in the same process.

    python benchmarks/csr_kernel/compare.py
"""

import time
import warnings

import torch

import synthprune
from synthprune import csr_kernel

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")


def cpu_ms(fn, calls: int = 50) -> float:
    fn()
    times = []
    for _ in range(calls):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return 1e3 * sorted(times)[calls // 2]


def main() -> None:
    torch.set_num_threads(1)
    ops = csr_kernel.ops()
    if ops is None:
        raise SystemExit(f"the fast kernel is not in use: {csr_kernel.describe()}")
    layer = synthprune.SparseLinear(1000, 1000, epsilon=20, generator=torch.Generator().manual_seed(0))
    x_t, g_t = torch.randn(1000, 128), torch.randn(1000, 128)
    crow, col, values, bias = layer._crow, layer._col, layer.values.detach(), layer.bias.detach()
    t_crow, t_col, t_perm = layer._t_crow, layer._t_col, layer._t_perm
    weight = torch.sparse_csr_tensor(crow, col, values, (1000, 1000))
    weight_t = torch.sparse_csr_tensor(t_crow, t_col, values[t_perm], (1000, 1000))

    def torch_backward():
        return (torch.sparse.mm(weight_t, g_t), torch.sparse.sampled_addmm(weight, g_t, x_t.t(), beta=0.0).values(),
                g_t.sum(1))

    pairs = {
        "forward (with bias)": (lambda: torch.addmm(bias.unsqueeze(1), weight, x_t),
                                lambda: ops.csr_spmm(crow, col, values, None, x_t, bias), 1),
        "input gradient": (lambda: torch.sparse.mm(weight_t, g_t),
                           lambda: ops.csr_spmm(t_crow, t_col, values, t_perm, g_t, None), 1),
        "value + bias gradient (SDDMM)": (
            lambda: (torch.sparse.sampled_addmm(weight, g_t, x_t.t(), beta=0.0).values(), g_t.sum(1)),
            lambda: ops.csr_backward(t_crow, t_col, t_perm, values, g_t, x_t, True, False)[1:], 1),
        "whole backward (fused)": (torch_backward,
                                   lambda: ops.csr_backward(t_crow, t_col, t_perm, values, g_t, x_t, True), 2),
    }
    dense, other = torch.randn(1000, 1000), torch.randn(1000, 128)
    gemm_ms = min(cpu_ms(lambda: torch.mm(dense, other)) for _ in range(3))
    limit_ms = gemm_ms * layer.nnz / 1000**2  # one product's multiply-adds at the GEMM rate
    print(f"GEMM 1000x1000x128: {gemm_ms:.3f} ms; one product's limit: {limit_ms:.3f} ms")
    for name, (theirs, ours, products) in pairs.items():
        for a, b in zip(theirs() if isinstance(theirs(), tuple) else (theirs(),),
                        ours() if isinstance(ours(), tuple) else (ours(),), strict=True):
            torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
        rounds = [(cpu_ms(theirs), cpu_ms(ours)) for _ in range(3)]
        print(f"{name}: torch.sparse {', '.join(f'{a:.3f}' for a, _ in rounds)} ms; kernel "
              f"{', '.join(f'{b:.3f}' for _, b in rounds)} ms; speed-up "
              f"{', '.join(f'{a / b:.2f}x' for a, b in rounds)}; kernel / limit "
              f"{', '.join(f'{b / (products * limit_ms):.1f}x' for _, b in rounds)}")


if __name__ == "__main__":
    main()
