"""Your own CNN in your own loop: sparsify its convolutions and linear layers, rewire every 20
optimizer steps while it shrinks to 30% of its weights, checkpoint and resume bit for bit, then
extract the compact network (BatchNorm folded, dead channels removed). Runs in seconds on
scikit-learn's 8x8 digits: python examples/your_cnn.py"""

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

import synthprune

digits = load_digits()
x, y = torch.tensor(digits.data, dtype=torch.float32) / 16, torch.tensor(digits.target)
(x_train, x_test), (y_train, y_test) = x.split(1500), y.split(1500)
torch.manual_seed(0)
model = nn.Sequential(
    nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
    nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
    nn.Linear(32 * 2 * 2, 64), nn.ReLU(), nn.Linear(64, 10))
synthprune.sparsify(model, density=0.5, exclude=["12"], seed=0)  # convolutions and the hidden layer
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
rewirer = synthprune.Rewirer(model, optimizer, grow="gradient", seed=0, compress_to=0.3, compress_end_step=10,
                             schedule=synthprune.RewireSchedule(every=20, until=400))


def train(steps: range) -> None:
    for step in steps:
        index = torch.randint(0, len(y_train), (32,))
        optimizer.zero_grad()
        F.cross_entropy(model(x_train[index]), y_train[index]).backward()
        optimizer.step()
        rewirer.maybe_step(step, batch=(x_train[index], y_train[index]))  # RigL growth: this batch


model.train()
train(range(1, 201))
synthprune.save_checkpoint("cnn-checkpoint.pt", model, optimizer, rewirer, step=200)
step = synthprune.load_checkpoint("cnn-checkpoint.pt", model, optimizer, rewirer)["step"]  # e.g. after a crash
train(range(step + 1, 501))
model.eval()
accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
compact, summary = synthprune.residual_network(model)
same = torch.allclose(compact(x_test), model(x_test), atol=1e-5)
print(f"test accuracy {accuracy:.3f}; rewiring steps {rewirer.step_count}; "
      f"connections {sum(summary.connections_before)} -> residual {sum(summary.connections_after)}; "
      f"channels and neurons {summary.neurons_before[1:-1]} -> {summary.neurons_after[1:-1]}; same outputs: {same}")
