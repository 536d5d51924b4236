"""Deployment (README, "Deployment"): compress a small MLP to 2% while it trains, export its
residual network as ONNX in each form, and run the files with onnxruntime.

    pip install 'synthprune[onnx]' onnxruntime && python examples/deploy_onnx.py
"""

import numpy as np
import onnxruntime as ort
import torch
import torch.nn.functional as F

import synthprune

x = torch.randn(2560, 64, generator=torch.Generator().manual_seed(0))
y = x[:, :8].argmax(1)  # only the first 8 of the 64 features matter
model = synthprune.SparseMLP([64, 256, 256, 8], epsilon=10, seed=0)
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
rewirer = synthprune.Rewirer(model, optimizer, grow="synthesis", seed=0, compress_to=0.02, compress_end_step=5)
for _ in range(8):
    for xb, yb in zip(x.split(64), y.split(64), strict=True):
        optimizer.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        optimizer.step()
    rewirer.step()
model.eval()
sizes, agree = {}, True
for form in ("auto", "sparse", "densify", "dense"):
    written = synthprune.export_onnx(model, f"model-{form}.onnx", form=form)  # its residual network
    session = ort.InferenceSession(str(written.path), providers=["CPUExecutionProvider"])
    logits = session.run(None, {"input": x[:100].numpy()})[0]
    agree &= np.allclose(logits, model(x[:100]).detach().numpy(), atol=1e-5, rtol=1e-5)
    sizes[form] = written.bytes
    print(f"{form:>8}: {written.bytes:>7,} bytes; {written.describe()}")
print(f"onnxruntime matches PyTorch: {agree}; sparse file {sizes['dense'] / sizes['sparse']:.0f}x smaller than dense")
