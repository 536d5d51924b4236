"""The README's quick start (kept identical by tests/test_readme.py)."""

import torch
import torch.nn.functional as F

import synthprune

x = torch.randn(2560, 64, generator=torch.Generator().manual_seed(0))
y = x[:, :8].argmax(1)  # a learnable rule: which of the first 8 features is largest
(x_train, x_test), (y_train, y_test) = x.split(2048), y.split(2048)  # 512 examples held out
model = synthprune.SparseMLP([64, 256, 256, 8], epsilon=10, backend="csr", seed=0)
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
rewirer = synthprune.Rewirer(model, optimizer, prune="set", grow="synthesis", zeta=0.3, seed=0)
for epoch in range(8):
    for xb, yb in zip(x_train.split(64), y_train.split(64), strict=True):
        optimizer.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        optimizer.step()
    reports = rewirer.step()  # prune 30% of each sparse layer, regrow as many by synthesis
    accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()  # on the held-out examples
    print(f"epoch {epoch}: held-out accuracy {accuracy:.3f}, connections {[r.connections for r in reports]}")
