"""Shared test helpers: a few training steps, optimizers, per-connection snapshots."""

import torch
import torch.nn.functional as F


def train_steps(model, optimizer, n, seed, n_in, n_out):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x = torch.randn(16, n_in, generator=g, dtype=next(model.parameters()).dtype)
        y = torch.randint(0, n_out, (16,), generator=g)
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    return x, y


def make_optimizer(kind, model):
    if kind == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    return torch.optim.Adam(model.parameters(), lr=1e-2)


def snapshot(layer, optimizer):
    """{key: (value, {state name: value})} for every connection of a layer."""
    param = layer.connection_parameter()
    state = {k: v for k, v in optimizer.state[param].items() if torch.is_tensor(v) and v.numel() > 1}
    keys = layer.keys().tolist()
    values = layer.connection_values().detach().tolist()
    per_key_state = {name: (t.view(-1)[layer.keys()] if layer.backend == "masked" else t).tolist()
                     for name, t in state.items()}
    return {k: (values[i], {n: s[i] for n, s in per_key_state.items()}) for i, k in enumerate(keys)}
