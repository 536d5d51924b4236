"""The csr backend scales with connections, not with n_in x n_out: a 20,000 x 20,000 layer at
ε = 20 trains and rewires with peak memory far below one dense weight matrix (1.6 GB)."""

import json
import subprocess
import sys
import textwrap

DENSE_BYTES = 20_000 * 20_000 * 4  # one float32 20,000 x 20,000 tensor

SCRIPT = textwrap.dedent(
    """
    import json, resource, time
    import torch
    from synthprune import Rewirer, SparseLinear

    def peak_bytes():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB

    torch.set_num_threads(2)
    torch.ones(1).sum()  # initialise torch before the baseline
    baseline = peak_bytes()
    t0 = time.perf_counter()
    layer = SparseLinear(20_000, 20_000, epsilon=20, backend="csr", generator=torch.Generator().manual_seed(0))
    model = torch.nn.Sequential(layer)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(128, 20_000, requires_grad=True)
    out = {"nnz": layer.nnz, "build_s": time.perf_counter() - t0}
    for _ in range(2):
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()
    out["train_peak"] = peak_bytes() - baseline
    batch = (x.detach()[:32], torch.randint(0, 20_000, (32,)))  # RigL: dense gradient in row chunks
    for grow in ("random", "synthesis", "gradient"):
        t0 = time.perf_counter()
        report = Rewirer(model, optimizer, grow=grow, loss_fn=torch.nn.functional.cross_entropy).step(batch)[0]
        out[grow] = {"grown": report.grown, "nnz": layer.nnz, "seconds": time.perf_counter() - t0}
    out["peak"] = peak_bytes() - baseline
    print(json.dumps(out))
    """
)


def test_20k_layer_trains_and_rewires_without_dense_memory():
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    print(figures)
    assert figures["nnz"] == 20 * 40_000
    for grow in ("random", "synthesis", "gradient"):
        assert figures[grow]["grown"] == round(0.3 * 800_000) and figures[grow]["nnz"] == 800_000
    # "far below" one dense matrix: under a quarter of it, for everything together
    assert figures["peak"] < DENSE_BYTES / 4, figures
