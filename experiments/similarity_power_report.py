"""Similarity with power (issue 16, item 4), from committed records alone.

The runs of ``experiments/similarity_power.yaml`` share their initial network (``wiring_seed``
0) and differ only in their training seed, so neurons keep their identity across runs and
wirings are compared as they are, with no matching. For each configuration and pair of seeds,
on the residual sub-networks (neurons on an input-to-output path):

* node level: Jaccard of the live nodes (kept pixels, live hidden neurons) at each level,
  against chance -- two random subsets of the same sizes, ``E|A∩B| = |A||B|/n``;
* edge level, per sparse layer: edge Jaccard, the share of each final wiring that is still its
  initial wiring, the **ceiling** that share allows (every grown connection shared:
  ``(|A∩B∩I| + min(|A∖I|, |B∖I|)) / union``), and the Jaccard of the *grown* connections alone
  (``A∖I`` against ``B∖I``) against chance among the slots the initial wiring left free.

    python experiments/similarity_power_report.py [RECORDS] [FIGURE]
    (default: experiments/results/similarity-power and docs/figures/similarity_power.png)

Prints Markdown tables on stdout.
"""

from __future__ import annotations

import itertools
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib
import numpy as np
import torch
import yaml

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from synthprune.config import TrainConfig
from synthprune.runs import build_model
from synthprune.wiring import Structure, load_snapshot, model_structure

N_FEATURES, N_CLASSES = 784, 10  # Fashion-MNIST


def records(folder: Path) -> dict[str, dict[int, Path]]:
    """``{configuration: {seed: record folder}}`` of records that hold a final wiring."""
    found: dict[str, dict[int, Path]] = defaultdict(dict)
    for wiring in sorted(folder.glob("*-s*/wiring.safetensors")):
        name, _, seed = wiring.parent.name.rpartition("-s")
        found[name][int(seed)] = wiring.parent
    return found


def initial_structure(record: Path) -> Structure:
    """The run's initial wiring, rebuilt from its config (the wiring seed fixes it)."""
    config = TrainConfig(**yaml.safe_load((record / "config.yaml").read_text()))
    return model_structure(build_model(config, N_FEATURES, N_CLASSES), "initial")


def live_nodes(structure: Structure) -> list[np.ndarray]:
    """Per level (inputs, hidden layers), the live nodes of a residual structure."""
    levels = [np.unique((structure.keys[0] % structure.widths[0]).numpy())]
    for i in range(len(structure.keys) - 1):
        levels.append(np.unique((structure.keys[i] // structure.widths[i]).numpy()))
    return levels


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    both = np.intersect1d(a, b, assume_unique=True).size
    union = a.size + b.size - both
    return both / union if union else 1.0


def chance_jaccard(a: int, b: int, n: int) -> float:
    """Jaccard of two uniformly random subsets of sizes a and b of n items (at the expected
    intersection ``ab/n``)."""
    both = a * b / n if n else 0.0
    union = a + b - both
    return both / union if union else 1.0


def pair_measures(a: Structure, b: Structure, initial: Structure) -> dict:
    """Node and edge measures of two residual structures from the same initial wiring."""
    result = {"nodes": [], "layers": []}
    for level, (na, nb) in enumerate(zip(live_nodes(a), live_nodes(b), strict=True)):
        n = a.widths[level]
        result["nodes"].append({"level": "pixels" if level == 0 else f"hidden {level}", "n": n,
                                "live": (na.size + nb.size) / 2, "jaccard": jaccard(na, nb),
                                "chance": chance_jaccard(na.size, nb.size, n)})
    for i, sparse in enumerate(a.sparse):
        if not sparse:
            continue
        ka, kb, ki = a.keys[i].numpy(), b.keys[i].numpy(), initial.keys[i].numpy()
        both = np.intersect1d(ka, kb, assume_unique=True)
        union = ka.size + kb.size - both.size
        grown_a, grown_b = np.setdiff1d(ka, ki, assume_unique=True), np.setdiff1d(kb, ki, assume_unique=True)
        shared_initial = np.intersect1d(both, ki, assume_unique=True).size
        best = shared_initial + min(grown_a.size, grown_b.size)
        free = a.widths[i] * a.widths[i + 1] - ki.size
        result["layers"].append({
            "layer": a.layer_names[i], "edge_jaccard": both.size / union if union else 1.0,
            "initial_share": 1 - (grown_a.size + grown_b.size) / max(ka.size + kb.size, 1),
            "ceiling": best / (ka.size + kb.size - best) if ka.size + kb.size > best else 1.0,
            # nothing grown (pruning alone): no grown connections to compare
            "grown_jaccard": jaccard(grown_a, grown_b) if grown_a.size + grown_b.size else None,
            "grown_chance": chance_jaccard(grown_a.size, grown_b.size, free) if grown_a.size + grown_b.size else None})
    return result


def grown(rows: list[dict]) -> str:
    """The grown connections' Jaccard and its chance level, or a dash where nothing grew."""
    if any(r["grown_jaccard"] is None for r in rows):
        return "— (nothing grown) | —"
    return f"{mean_sd([r['grown_jaccard'] for r in rows])} | {statistics.fmean(r['grown_chance'] for r in rows):.4f}"


def mean_sd(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.3f}"
    return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f}"


def main(folder: Path, figure: Path) -> None:
    runs = records(folder)
    if not runs:
        sys.exit(f"{folder}: no <configuration>-s<seed>/wiring.safetensors records")
    measured: dict[str, list[dict]] = {}
    for name, by_seed in sorted(runs.items()):
        initial = initial_structure(next(iter(by_seed.values()))).residual()
        structures = {seed: load_snapshot(path / "wiring.safetensors").residual() for seed, path in by_seed.items()}
        measured[name] = [pair_measures(structures[s], structures[t], initial)
                          for s, t in itertools.combinations(sorted(structures), 2)]

    print("#### Node level: live pixels and hidden neurons (same initial network, no matching)\n")
    print("| configuration | pairs | level | live (of n) | Jaccard (mean ± sd) | chance, same counts |")
    print("|---|---|---|---|---|---|")
    for name, pairs in measured.items():
        if not pairs:
            continue
        for level in range(len(pairs[0]["nodes"])):
            rows = [p["nodes"][level] for p in pairs]
            print(f"| {name} | {len(pairs)} | {rows[0]['level']} | {statistics.fmean(r['live'] for r in rows):.0f} "
                  f"of {rows[0]['n']} | {mean_sd([r['jaccard'] for r in rows])} "
                  f"| {statistics.fmean(r['chance'] for r in rows):.3f} |")

    print("\n#### Edge level, per sparse layer\n")
    print("| configuration | layer | edge Jaccard | final wiring still initial | ceiling from that | "
          "grown connections' Jaccard | chance |")
    print("|---|---|---|---|---|---|---|")
    for name, pairs in measured.items():
        if not pairs:
            continue
        for index in range(len(pairs[0]["layers"])):
            rows = [p["layers"][index] for p in pairs]
            print(f"| {name} | {rows[0]['layer']} | {mean_sd([r['edge_jaccard'] for r in rows])} "
                  f"| {statistics.fmean(r['initial_share'] for r in rows):.1%} "
                  f"| {statistics.fmean(r['ceiling'] for r in rows):.3f} "
                  f"| {grown(rows)} |")
    plot_nodes(measured, figure)
    print(f"\nfigure: {figure}")


def plot_nodes(measured: dict[str, list[dict]], figure: Path) -> None:
    """Node-level Jaccard against chance, per configuration and level."""
    names = [name for name, pairs in measured.items() if pairs]
    levels = len(measured[names[0]][0]["nodes"])
    fig, axes = plt.subplots(1, levels, figsize=(3.2 * levels, 3.6), sharey=True)
    for level, ax in enumerate(np.atleast_1d(axes)):
        observed = [statistics.fmean(p["nodes"][level]["jaccard"] for p in measured[n]) for n in names]
        chance = [statistics.fmean(p["nodes"][level]["chance"] for p in measured[n]) for n in names]
        x = np.arange(len(names))
        ax.bar(x - 0.2, observed, 0.4, label="runs (mean over pairs)")
        ax.bar(x + 0.2, chance, 0.4, label="chance, same counts", color="0.7")
        ax.set_xticks(x, names, rotation=60, ha="right", fontsize=7)
        ax.set_title(measured[names[0]][0]["nodes"][level]["level"])
        ax.set_ylim(0, 1.05)
    np.atleast_1d(axes)[0].set_ylabel("Jaccard of live nodes")
    handles, labels = np.atleast_1d(axes)[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=2, fontsize=8)
    figure.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    fig.savefig(figure, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    arguments = sys.argv[1:]
    torch.set_num_threads(1)
    main(Path(arguments[0]) if arguments else Path("experiments/results/similarity-power"),
         Path(arguments[1]) if len(arguments) > 1 else Path("docs/figures/similarity_power.png"))
