"""A first hand-written CSR kernel (csr_kernels.cpp, built with torch.utils.cpp_extension; needs
gcc and ninja) against the torch.sparse products the csr layer uses, on one 1000 -> 1000 layer
at ε = 20 (40,000 connections), batch 128, one thread: CPU time per call (median of 50), three
rounds. Checks that both agree to float rounding first. Not wired into the layer yet (issue 15).

    python benchmarks/csr_kernel/compare.py
"""

import time
import warnings
from pathlib import Path

import torch
from torch.utils.cpp_extension import load

import synthprune

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
HERE = Path(__file__).resolve().parent


def cpu_ms(fn, calls: int = 50) -> float:
    fn()
    times = []
    for _ in range(calls):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return 1e3 * sorted(times)[calls // 2]


def main() -> None:
    kernels = load("synthprune_csr_prototype", [str(HERE / "csr_kernels.cpp")],
                   extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"])
    torch.set_num_threads(1)
    layer = synthprune.SparseLinear(1000, 1000, epsilon=20, generator=torch.Generator().manual_seed(0))
    x_t, g_t = torch.randn(1000, 128), torch.randn(1000, 128)
    crow, col, values, bias = layer._crow, layer._col, layer.values.detach(), layer.bias.detach()
    weight = torch.sparse_csr_tensor(crow, col, values, (1000, 1000))
    weight_t = torch.sparse_csr_tensor(layer._t_crow, layer._t_col, values[layer._t_perm], (1000, 1000))
    pairs = {
        "forward": (lambda: torch.addmm(bias.unsqueeze(1), weight, x_t),
                    lambda: kernels.spmm(crow, col, values, None, x_t, bias)),
        "input gradient": (lambda: torch.sparse.mm(weight_t, g_t),
                           lambda: kernels.spmm(layer._t_crow, layer._t_col, values, layer._t_perm, g_t, None)),
        "value gradient (SDDMM)": (lambda: torch.sparse.sampled_addmm(weight, g_t, x_t.t(), beta=0.0).values(),
                                   lambda: kernels.sddmm(crow, col, g_t, x_t)),
    }
    for name, (theirs, ours) in pairs.items():
        torch.testing.assert_close(ours(), theirs(), atol=1e-4, rtol=1e-4)
        rounds = [(cpu_ms(theirs), cpu_ms(ours)) for _ in range(3)]
        speedups = ", ".join(f"{a / b:.2f}x" for a, b in rounds)
        print(f"{name}: torch.sparse {', '.join(f'{a:.3f}' for a, _ in rounds)} ms; kernel "
              f"{', '.join(f'{b:.3f}' for _, b in rounds)} ms; speed-up {speedups}")


if __name__ == "__main__":
    main()
