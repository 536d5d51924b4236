"""Figures from run directories (matplotlib, Agg): they read the run records, never a live run."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from matplotlib.ticker import MaxNLocator

from synthprune.layers import SparseLinear
from synthprune.models import weight_layers
from synthprune.rundir import RunDir
from synthprune.runs import load_run_model

__all__ = ["accuracy_vs_connections", "input_connectivity", "plot_runs", "similarity_heatmap"]


def input_connectivity(model: torch.nn.Module) -> torch.Tensor | None:
    """Connections each input feature keeps in the first layer: ``[n_in]``; ``None`` when the
    first layer is a convolution (its inputs are shared by every position: no per-pixel wiring)."""
    _, first = weight_layers(model)[0]
    if not isinstance(first, (SparseLinear, torch.nn.Linear)):
        return None
    if isinstance(first, SparseLinear):
        return torch.bincount(first.edge_index()[1].cpu(), minlength=first.in_features)
    return torch.full((first.in_features,), first.out_features)


def _save(fig: plt.Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    for ax in fig.axes:
        if ax.get_xlabel() == "epoch":
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_runs(runs: list[str | Path], out: str | Path) -> list[Path]:
    """Write ``accuracy.png``, ``connections.png`` and ``input_connectivity.png`` for one or
    several runs (overlaid) into ``out``; returns the paths written. Input connectivity is
    drawn for finished runs whose first layer is linear (not for a CNN)."""
    out = Path(out)
    records = [(Path(r).name, RunDir(r).read_metrics()) for r in runs]
    written = []

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, rows in records:
        ax.plot([r["epoch"] for r in rows], [100 * r["test_accuracy"] for r in rows], marker="o", ms=3, label=name)
    ax.set(xlabel="epoch", ylabel="test accuracy (%)", title="Test accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    written.append(_save(fig, out / "accuracy.png"))

    # metrics.csv lists layers in model order; keep that order across runs
    layer_names = list(dict.fromkeys(k for _, rows in records for k in rows[0] if k.startswith("connections_")))
    fig, axes = plt.subplots(1, len(layer_names), figsize=(3.2 * len(layer_names), 3.4), squeeze=False)
    for ax, key in zip(axes[0], layer_names, strict=True):
        for name, rows in records:
            if key in rows[0]:
                ax.plot([r["epoch"] for r in rows], [r[key] for r in rows], marker="o", ms=3, label=name)
        ax.set(xlabel="epoch", title=key.removeprefix("connections_"))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("connections")
    axes[0][-1].legend(fontsize=7)
    written.append(_save(fig, out / "connections.png"))

    finished = [(Path(r), counts) for r in runs if RunDir(r).is_finished()
                and (counts := input_connectivity(load_run_model(r)[0])) is not None]
    if finished:
        fig, axes = plt.subplots(1, len(finished), figsize=(3.6 * len(finished), 3.4), squeeze=False)
        for ax, (run, counts) in zip(axes[0], finished, strict=True):
            counts = counts.float()
            side = math.isqrt(counts.numel())
            image = counts.view(side, side) if side * side == counts.numel() else counts.view(1, -1)
            shown = ax.imshow(image.numpy(), cmap="viridis")
            ax.set(title=f"{run.name}\n{int((counts > 0).sum())}/{counts.numel()} inputs connected")
            ax.axis("off")
            fig.colorbar(shown, ax=ax, fraction=0.046, label="connections per input")
        written.append(_save(fig, out / "input_connectivity.png"))
    return written


def accuracy_vs_connections(points: list[dict], path: str | Path, title: str = "") -> Path:
    """Test accuracy against connections, one line per ``group``, with mean ± std over seeds.

    ``points``: dicts with ``group`` (legend label), ``connections`` and ``accuracy`` (in
    [0, 1]), optionally ``setting`` (points of a group with the same setting -- seeds -- are
    averaged; default: the same connections) and ``color``/``marker``/``markersize`` (the
    group's first point decides).
    The x axis is logarithmic: compression targets are usually halvings.
    """
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    groups: dict[str, dict[float, list[tuple[float, float]]]] = {}
    styles: dict[str, dict] = {}
    for point in points:
        styles.setdefault(point["group"], {k: point[k] for k in ("color", "marker", "markersize") if k in point})
        by_setting = groups.setdefault(point["group"], {})
        by_setting.setdefault(point.get("setting", point["connections"]), []).append(
            (point["connections"], 100 * point["accuracy"]))
    for group, settings in groups.items():
        xs, ys, errs = [], [], []
        for values in sorted(settings.values(), key=lambda v: sum(x for x, _ in v)):
            conns = torch.tensor([x for x, _ in values], dtype=torch.float64)
            accs = torch.tensor([y for _, y in values], dtype=torch.float64)
            xs.append(float(conns.mean()))
            ys.append(float(accs.mean()))
            errs.append(float(accs.std()) if len(values) > 1 else 0.0)
        ax.errorbar(xs, ys, yerr=errs, capsize=3, label=group, **{"marker": "o", **styles[group]})
    ax.set_xscale("log")
    ax.set_xlabel("connections (log scale)")
    ax.set_ylabel("test accuracy (%)")
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    return _save(fig, Path(path))


def similarity_heatmap(names: list[str], matrix, measure: str, path: str | Path) -> Path:
    """A pairwise similarity matrix as a heatmap with the values written in the cells."""
    n = len(names)
    size = max(4.0, 0.55 * n + 2.5)
    fig, ax = plt.subplots(figsize=(size + 1.2, size))
    image = ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis")
    labels = [Path(name).name or name for name in names]
    ax.set_xticks(range(n), labels, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(n), labels, fontsize=8)
    if n <= 20:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, f"{matrix[i][j]:.2f}", ha="center", va="center", fontsize=7,
                        color="black" if matrix[i][j] > 0.6 else "white")
    fig.colorbar(image, ax=ax, label=measure.replace("_", " "))
    return _save(fig, Path(path))
