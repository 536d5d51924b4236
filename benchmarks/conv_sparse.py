"""Should sparse convolutions be truly sparse on CPU? Masked (a dense conv on weight × mask,
forward and backward) against im2col + a CSR × dense product (forward only: a truly sparse
backward would add the transposed product and an SDDMM). LeNet-sized layers, batch 128, one
thread, CPU time per call (median of 20 calls after a warm-up), three rounds.

    python benchmarks/conv_sparse.py
"""

import time
import warnings

import torch
import torch.nn.functional as F

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")


def cpu_ms(fn, calls: int = 20) -> float:
    fn()
    times = []
    for _ in range(calls):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return 1e3 * sorted(times)[calls // 2]


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    for c_in, c_out, side, density in [(1, 6, 28, 0.2), (6, 16, 14, 0.2), (16, 32, 14, 0.1)]:
        x = torch.randn(128, c_in, side, side, requires_grad=True)
        mask = torch.rand(c_out, c_in, 5, 5) < density
        weight = (torch.randn(c_out, c_in, 5, 5) * mask).requires_grad_()
        csr = weight.detach().reshape(c_out, -1).to_sparse_csr()

        def masked(x=x, weight=weight, mask=mask):
            F.conv2d(x, weight * mask).sum().backward()

        def im2col_csr(x=x, csr=csr, c_in=c_in):
            columns = F.unfold(x.detach(), 5).transpose(0, 1).reshape(c_in * 25, -1)
            torch.sparse.mm(csr, columns)

        rounds = [(cpu_ms(masked), cpu_ms(im2col_csr)) for _ in range(3)]
        print(f"conv {c_in}->{c_out}, {side}x{side}, density {density}: masked forward+backward "
              f"{', '.join(f'{a:.2f}' for a, _ in rounds)} ms; im2col+CSR forward only "
              f"{', '.join(f'{b:.2f}' for _, b in rounds)} ms; ratio {', '.join(f'{b / a:.1f}x' for a, b in rounds)}")


if __name__ == "__main__":
    main()
