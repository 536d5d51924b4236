"""The README's compression example (kept identical by tests/test_readme.py)."""

import torch
import torch.nn.functional as F

import synthprune

x = torch.randn(2560, 64, generator=torch.Generator().manual_seed(0))
y = x[:, :8].argmax(1)  # only the first 8 of the 64 features matter
(x_train, x_test), (y_train, y_test) = x.split(2048), y.split(2048)  # 512 examples held out
model = synthprune.SparseMLP([64, 256, 256, 8], epsilon=10, seed=0)
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
rewirer = synthprune.Rewirer(model, optimizer, grow="synthesis", seed=0,
                             compress_to=0.01, compress_end_step=9)  # 1% of the weights after step 9
for _ in range(12):
    for xb, yb in zip(x_train.split(64), y_train.split(64), strict=True):
        optimizer.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        optimizer.step()
    rewirer.step()
compact, summary = synthprune.residual_network(model.eval())
accuracy = (compact(x_test).argmax(1) == y_test).float().mean().item()
print(f"held-out accuracy {accuracy:.3f}, neurons {summary.neurons_after}, connections {summary.connections_after}")
synthprune.save_residual(compact, "residual-net")  # load with synthprune.load_residual("residual-net")
