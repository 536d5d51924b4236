"""How alike two sparse networks' wirings are (DESIGN §2.6).

Both networks are reduced to their **residual sub-networks** (the neurons on an input-to-output
path, :func:`synthprune.residual.live_masks`) in the original neuron numbering, then compared
layer by layer:

* ``node_jaccard``: Jaccard index of the layer's input-side neurons that have a connection
  (for the first layer: which input features survive; their identity is fixed);
* ``edge_jaccard`` = ``|E∩E'| / |E∪E'|`` and ``edge_overlap`` = ``|E∩E'| / min(|E|, |E'|)``,
  **raw**: meaningful when the runs share their initial network (two strategies, one seed);
* with ``match="hungarian"``, the same two **after matching hidden neurons** across the runs:
  from the input layer up, each hidden neuron of B is paired with one of A by
  ``scipy.optimize.linear_sum_assignment`` on the normalised edit distance of their input sets
  (``1 − Jaccard``, inputs already matched); and ``nnstd``, the mean distance of the matched
  pairs (Liu et al. 2020's Neural Network Sparse Topology Distance; pairs of two neurons
  without inputs are left out). Meaningful across seeds, where neuron numbering is arbitrary.

Similarities are in [0, 1] (1: identical), ``nnstd`` in [0, 1] (0: identical). "Overall"
figures pool the sparse layers; a dense layer's wiring is fixed by design, not learnt, so it is
reported per layer but left out of the overall figures.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from scipy.sparse import csr_matrix
from torch import nn

from synthprune.files import atomic_write, read_json
from synthprune.residual import FORMAT as RESIDUAL_FORMAT
from synthprune.residual import ResidualMLP, load_residual
from synthprune.wiring import Structure, load_snapshot, model_structure, residual_structure, save_snapshot

__all__ = [
    "MATCHES", "MEASURES", "LayerSimilarity", "Similarity", "Structure", "load_snapshot", "over_epochs",
    "save_snapshot", "similarity", "similarity_matrix", "structure_of", "write_matrix",
]

MATCHES = ("none", "hungarian")


def _default_measure(match: str) -> str:
    """The matrix entry when none is asked for: matched Jaccard if neurons are matched."""
    return "matched_edge_jaccard" if match == "hungarian" else "edge_jaccard"

MEASURES = ("input_jaccard", "edge_jaccard", "edge_overlap", "matched_edge_jaccard", "matched_edge_overlap", "nnstd")


@dataclass(kw_only=True)
class EdgeMeasures:
    """The edge measures shared by a layer and a whole network (``None``: not matched)."""

    edge_jaccard: float
    edge_overlap: float
    matched_edge_jaccard: float | None = None
    matched_edge_overlap: float | None = None
    nnstd: float | None = None


@dataclass(kw_only=True)
class LayerSimilarity(EdgeMeasures):
    layer: str
    sparse: bool
    connections_a: int
    connections_b: int
    node_jaccard: float


@dataclass(kw_only=True)
class Similarity(EdgeMeasures):
    """Per-layer and overall similarity of two networks (see the module docstring)."""

    a: str
    b: str
    match: str
    layers: list[LayerSimilarity]
    input_jaccard: float

    def as_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------- structures


def structure_of(source: nn.Module | str | Path | Structure, residual: bool = True) -> Structure:
    """The (residual) wiring of a model, a run directory, a saved residual network folder, or
    a topology snapshot file (``train --save-topology-every``)."""
    if isinstance(source, Structure):
        structure = source
    elif isinstance(source, nn.Module):
        structure = (residual_structure(source, type(source).__name__) if isinstance(source, ResidualMLP)
                     else model_structure(source, type(source).__name__))
    else:
        path = Path(source)
        if path.is_file() and path.suffix == ".safetensors":
            structure = load_snapshot(path)
        elif (path / "config.json").is_file() and read_json(path / "config.json", "pass a run directory, a "
                                                              "residual folder or a snapshot").get(
                "format") == RESIDUAL_FORMAT:
            structure = residual_structure(load_residual(path), str(path))
        elif not path.exists():
            raise ValueError(f"{path}: not found; pass a run directory, a residual folder or a topology snapshot")
        else:
            from synthprune.runs import load_run_model

            model, _ = load_run_model(path)
            structure = model_structure(model, str(path))
            structure.name = str(path)
    return structure.residual() if residual else structure


# --------------------------------------------------------------------------- measures


def _jaccard(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float, int]:
    """(Jaccard, overlap coefficient, intersection) of two sorted unique key sets."""
    both = int(np.intersect1d(a.numpy(), b.numpy(), assume_unique=True).size)
    union = a.numel() + b.numel() - both
    smaller = min(a.numel(), b.numel())
    return (both / union if union else 1.0), (both / smaller if smaller else float(union == 0)), both


def _adjacency(keys: torch.Tensor, n_in: int, n_out: int, cols_map: np.ndarray | None = None) -> csr_matrix:
    rows, cols = (keys // n_in).numpy(), (keys % n_in).numpy()
    if cols_map is not None:
        cols = cols_map[cols]
    return csr_matrix((np.ones(rows.size, dtype=np.float64), (rows, cols)), shape=(n_out, n_in))


def _match_layer(a_keys, b_keys, n_in, n_out, b_cols_to_a) -> tuple[np.ndarray, float]:
    """Pair B's output neurons with A's by minimum total normalised edit distance of their input
    sets; returns (``b_to_a[j]`` = the A neuron of B's neuron j, mean matched distance)."""
    adj_a = _adjacency(a_keys, n_in, n_out)
    adj_b = _adjacency(b_keys, n_in, n_out, b_cols_to_a)
    both = (adj_a @ adj_b.T).toarray()  # [n_out, n_out] shared inputs of A's i and B's j
    size_a = np.asarray(adj_a.sum(1)).ravel()
    size_b = np.asarray(adj_b.sum(1)).ravel()
    union = size_a[:, None] + size_b[None, :] - both
    distance = np.where(union > 0, 1.0 - both / np.maximum(union, 1), 0.0)
    a_index, b_index = linear_sum_assignment(distance)
    b_to_a = np.empty(n_out, dtype=np.int64)
    b_to_a[b_index] = a_index
    counted = union[a_index, b_index] > 0  # leave out pairs of two neurons without inputs
    return b_to_a, float(distance[a_index, b_index][counted].mean()) if counted.any() else 0.0


def similarity(a, b, match: str = "hungarian", residual: bool = True) -> Similarity:
    """Similarity of two networks' wirings (models, run directories, residual folders or
    snapshots; see the module docstring). Raises ``ValueError`` for different architectures."""
    if match not in MATCHES:
        raise ValueError(f"unknown match {match!r}; valid: {', '.join(MATCHES)}")
    sa, sb = structure_of(a, residual), structure_of(b, residual)
    if sa.widths != sb.widths:
        raise ValueError(f"{sa.name} has layer sizes {sa.widths} but {sb.name} has {sb.widths}: "
                         "similarity needs the same architecture")
    layers = []
    totals = {"both": 0, "a": 0, "b": 0, "matched_both": 0}
    cols_to_a = np.arange(sa.widths[0])  # input features: identity is fixed
    for i, name in enumerate(sa.layer_names):
        n_in, n_out = sa.widths[i], sa.widths[i + 1]
        nodes_a = torch.unique(sa.keys[i] % n_in)
        nodes_b = torch.unique(sb.keys[i] % n_in)
        node_jaccard, _, _ = _jaccard(nodes_a, nodes_b)
        edge_jaccard, edge_overlap, both = _jaccard(sa.keys[i], sb.keys[i])
        result = LayerSimilarity(layer=name, sparse=sa.sparse[i] or sb.sparse[i], connections_a=sa.keys[i].numel(),
                                 connections_b=sb.keys[i].numel(), node_jaccard=node_jaccard,
                                 edge_jaccard=edge_jaccard, edge_overlap=edge_overlap)
        if match == "hungarian":
            last = i == len(sa.layer_names) - 1
            if last:  # the outputs keep their identity; only their inputs are renumbered
                rows_to_a = np.arange(n_out)
                distance = _matched_distance(sa.keys[i], sb.keys[i], n_in, n_out, cols_to_a)
            else:
                rows_to_a, distance = _match_layer(sa.keys[i], sb.keys[i], n_in, n_out, cols_to_a)
            rows, cols = (sb.keys[i] // n_in).numpy(), (sb.keys[i] % n_in).numpy()
            mapped = torch.from_numpy(np.sort(rows_to_a[rows] * n_in + cols_to_a[cols]))
            result.matched_edge_jaccard, result.matched_edge_overlap, matched_both = _jaccard(sa.keys[i], mapped)
            result.nnstd = distance
            cols_to_a = rows_to_a
            if result.sparse:
                totals["matched_both"] += matched_both
        if result.sparse:
            totals["both"] += both
            totals["a"] += sa.keys[i].numel()
            totals["b"] += sb.keys[i].numel()
        layers.append(result)

    def pooled(both: int) -> tuple[float, float]:
        union = totals["a"] + totals["b"] - both
        smaller = min(totals["a"], totals["b"])
        return (both / union if union else 1.0), (both / smaller if smaller else 1.0)

    edge_jaccard, edge_overlap = pooled(totals["both"])
    overall = Similarity(a=sa.name, b=sb.name, match=match, layers=layers, input_jaccard=layers[0].node_jaccard,
                         edge_jaccard=edge_jaccard, edge_overlap=edge_overlap)
    if match == "hungarian":
        overall.matched_edge_jaccard, overall.matched_edge_overlap = pooled(totals["matched_both"])
        sparse_distances = [layer.nnstd for layer in layers if layer.sparse]
        overall.nnstd = float(np.mean(sparse_distances)) if sparse_distances else 0.0
    return overall


def _matched_distance(a_keys, b_keys, n_in, n_out, b_cols_to_a) -> float:
    """Mean normalised edit distance of same-numbered output neurons (no matching)."""
    adj_a = _adjacency(a_keys, n_in, n_out)
    adj_b = _adjacency(b_keys, n_in, n_out, b_cols_to_a)
    both = np.asarray(adj_a.multiply(adj_b).sum(1)).ravel()
    union = np.asarray(adj_a.sum(1)).ravel() + np.asarray(adj_b.sum(1)).ravel() - both
    counted = union > 0
    return float((1.0 - both[counted] / union[counted]).mean()) if counted.any() else 0.0


# --------------------------------------------------------------------------- many networks


def similarity_matrix(sources: list, match: str = "hungarian", residual: bool = True,
                      measure: str | None = None) -> tuple[list[str], np.ndarray]:
    """(names, ``[n, n]`` matrix of ``measure``) over every pair of ``sources``; each network
    is loaded once."""
    measure = measure or _default_measure(match)
    if measure not in MEASURES:
        raise ValueError(f"unknown measure {measure!r}; valid: {', '.join(MEASURES)}")
    if match == "none" and (measure.startswith("matched") or measure == "nnstd"):
        raise ValueError(f"measure {measure!r} needs --match hungarian")
    structures = [structure_of(source, residual) for source in sources]
    n = len(structures)
    matrix = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            if j < i:
                matrix[i, j] = matrix[j, i]
            else:
                value = getattr(similarity(structures[i], structures[j], match, residual=False), measure)
                matrix[i, j] = value
    return [s.name for s in structures], matrix


def write_matrix(sources: list, folder: str | Path, match: str = "hungarian", residual: bool = True,
                 measure: str | None = None) -> list[Path]:
    """``similarity.csv`` and ``similarity.png`` (a heatmap) of every pair of ``sources``."""
    import csv
    import io

    from synthprune.plots import similarity_heatmap

    measure = measure or _default_measure(match)
    names, matrix = similarity_matrix(sources, match, residual, measure)
    folder = Path(folder)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow([measure, *names])
    for name, row in zip(names, matrix, strict=True):
        writer.writerow([name, *(f"{v:.6f}" for v in row)])
    atomic_write(folder / "similarity.csv", buffer.getvalue())
    return [folder / "similarity.csv", similarity_heatmap(names, matrix, measure, folder / "similarity.png")]


def over_epochs(run: str | Path, residual: bool = True) -> list[dict]:
    """How settled a run's wiring is: edge Jaccard of each saved snapshot with the previous one
    and with the last one (same run: neuron identities are fixed, no matching)."""
    from synthprune.rundir import RunDir

    snapshots = sorted(RunDir(run).snapshots.glob("epoch-*.safetensors"))
    if not snapshots:
        raise ValueError(f"{run} has no topology snapshots: train with --save-topology-every N")
    structures = [structure_of(path, residual) for path in snapshots]
    rows = []
    for k, current in enumerate(structures):
        epoch = int(snapshots[k].stem.removeprefix("epoch-"))
        previous = similarity(structures[k - 1], current, "none", residual=False).edge_jaccard if k else None
        final = similarity(current, structures[-1], "none", residual=False).edge_jaccard
        rows.append({"epoch": epoch, "vs_previous": previous, "vs_final": final})
    return rows
