"""File size and onnxruntime latency of the ONNX forms against the PyTorch residual network.

The reference MLP (784-1000-1000-1000-10, ε = 20) is compressed by magnitude pruning of its
initial weights (untrained: the values do not change the work) to 4.5% (no compression), 1%
and 0.2% of the sparse layers' dense weights. Its residual network is exported with
``synthprune.export_onnx`` in each form and saved as safetensors. Latency at batch 1 and 256:
onnxruntime (one intra-op thread, CPU provider) and PyTorch (one thread), the contenders
alternating round by round in one process (``synthprune.bench._alternate``, medians), three
rounds of that.

    python benchmarks/onnx_forms.py            # ~2 min here
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

import synthprune
from synthprune import csr_kernel
from synthprune.bench import _alternate

SIZES = [784, 1000, 1000, 1000, 10]
TARGETS = {"4.5%": None, "1%": 0.01, "0.2%": 0.002}
FORMS = ("dense", "densify", "sparse", "auto")


def compressed(target: float | None) -> synthprune.SparseMLP:
    torch.manual_seed(0)
    model = synthprune.SparseMLP(SIZES, epsilon=20)
    if target is not None:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        synthprune.Rewirer(model, optimizer, grow="none", prune="magnitude", compress_to=target,
                           compress_end_step=0).step()
    return model.eval()


def session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def main() -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    print(f"csr path: {csr_kernel.describe()}; onnxruntime {ort.__version__}; torch {torch.__version__}")
    folder = Path(tempfile.mkdtemp(prefix="synthprune-onnx-bench-"))
    for label, target in TARGETS.items():
        model = compressed(target)
        residual, summary = synthprune.residual_network(model)
        synthprune.save_residual(residual, folder / label)
        sizes = {"safetensors": (folder / label / "model.safetensors").stat().st_size}
        sessions = {}
        for form in FORMS:
            written = synthprune.export_onnx(residual, folder / f"{label}-{form}.onnx", form=form)
            sizes[form] = written.bytes
            sessions[form] = session(written.path)
            forms = written.describe()
            if form != "dense":
                print(f"{label} {form}: {forms}")
        connections = sum(summary.connections_after)
        print(f"\n{label}: {connections:,} connections; bytes: " + ", ".join(f"{k} {v:,}" for k, v in sizes.items())
              + f"; auto/safetensors {sizes['auto'] / sizes['safetensors']:.2f}x, "
              f"sparse/safetensors {sizes['sparse'] / sizes['safetensors']:.2f}x")
        for batch in (1, 256):
            x = torch.randn(batch, SIZES[0])
            feed = {"input": x.numpy()}
            expected = residual(x).detach().numpy()
            for s in sessions.values():
                np.testing.assert_allclose(s.run(None, feed)[0], expected, atol=1e-5, rtol=1e-5)
            contenders = {f"onnx {form}": (lambda s=s, feed=feed: s.run(None, feed)) for form, s in sessions.items()}
            contenders["pytorch residual"] = lambda net=residual, x=x: net(x)
            calls = 50 if batch == 1 else 5
            with torch.no_grad():
                rounds = [_alternate(contenders, 5, calls) for _ in range(3)]
            cells = [f"{name} " + "/".join(f"{1e3 * r[name]:.3f}" for r in rounds) for name in contenders]
            print(f"  batch {batch} (ms, 3 rounds): " + "; ".join(cells))


if __name__ == "__main__":
    main()
