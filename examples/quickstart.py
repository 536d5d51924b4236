"""The README's quick start (kept identical by tests/test_readme.py)."""

import torch
import torch.nn.functional as F

import synthprune

x = torch.randn(2048, 64, generator=torch.Generator().manual_seed(0))
y = x[:, :8].argmax(1)  # a learnable rule: which of the first 8 features is largest
model = synthprune.SparseMLP([64, 256, 256, 8], epsilon=10, backend="csr", seed=0)
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
rewirer = synthprune.Rewirer(model, optimizer, prune="set", grow="synthesis", zeta=0.3, seed=0)
for epoch in range(8):
    for xb, yb in zip(x.split(64), y.split(64), strict=True):
        optimizer.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        optimizer.step()
    reports = rewirer.step()  # prune 30% of each sparse layer, regrow as many by synthesis
    accuracy = (model(x).argmax(1) == y).float().mean().item()
    print(f"epoch {epoch}: accuracy {accuracy:.3f}, connections {[r.connections for r in reports]}")
