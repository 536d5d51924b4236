"""The similarity part of docs/RESULTS.md: how much structure the residual sub-networks share.

    python experiments/similarity_report.py [RUNS_FOLDER] [FIGURES_FOLDER]
    (default: runs/reference/e10 and docs/figures)

* across seeds, for each strategy: every pair of seeds, after matching hidden neurons
  (Hungarian, NNSTD) -- the paper's "share up to ~90% of their structure";
* from the same initial network (same seed), between strategies: raw, no matching;
* a heatmap of matched edge Jaccard over synthesis and SET runs of all seeds.
Prints Markdown tables on stdout.
"""

from __future__ import annotations

import itertools
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import torch

from synthprune.compare import Structure, load_snapshot, similarity, structure_of, write_matrix
from synthprune.rundir import RunDir

STRATEGIES = {
    "synthesis-full": "synthesis", "synthesis_tail-full": "synthesis (tail)", "random-full": "SET",
    "none-full": "static", "gradient-full": "RigL", "synthesis-0.01": "synthesis + compression to 1%",
    "random-0.01": "SET + compression to 1%",
}
PAIRS = [("synthesis-full", "random-full"), ("synthesis-full", "none-full"), ("random-full", "none-full"),
         ("synthesis-full", "synthesis_tail-full"), ("synthesis-full", "gradient-full"),
         ("synthesis-0.01", "random-0.01")]


def random_like(structure: Structure, seed: int) -> Structure:
    """Uniformly random wiring with the same number of connections in every layer."""
    generator = torch.Generator().manual_seed(seed)
    keys = [key if not sparse else torch.randperm(n_in * n_out, generator=generator)[: key.numel()].sort().values
            for key, sparse, n_in, n_out in zip(structure.keys, structure.sparse, structure.widths[:-1],
                                                structure.widths[1:], strict=True)]
    return Structure(f"random {seed}", structure.widths, keys, structure.sparse)


def survival(run: Path) -> str:
    """Of the connections grown at each step, the share still there after the next step; the
    share of the final wiring that was there at initialisation; consecutive-epoch similarity."""
    paths = sorted((run / "topology").glob("epoch-*.safetensors"))[1:]  # epoch 1 on: the wiring trained
    structures = [load_snapshot(path) for path in paths]
    sparse = [i for i, flag in enumerate(structures[0].sparse) if flag]
    snaps = [{i: set(s.keys[i].tolist()) for i in sparse} for s in structures]
    alive = []
    for before, now, after in zip(snaps, snaps[1:], snaps[2:], strict=False):
        grown = {i: now[i] - before[i] for i in sparse}
        alive.append(sum(len(grown[i] & after[i]) for i in sparse) / sum(len(grown[i]) for i in sparse))
    initial = sum(len(snaps[0][i] & snaps[-1][i]) for i in sparse) / sum(len(snaps[-1][i]) for i in sparse)
    consecutive = [similarity(a, b, "none", residual=False).edge_jaccard
                   for a, b in itertools.pairwise(structures)]
    return (f"| {run.name} | {', '.join(f'{100 * a:.1f}%' for a in alive)} | {100 * initial:.1f}% "
            f"| {statistics.mean(consecutive):.3f} |")


def stats(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f} (max {max(values):.3f})"


def main(folder: Path, figures: Path) -> None:
    runs: dict[str, dict[int, Path]] = defaultdict(dict)
    for path in sorted(folder.glob("*/final/model.safetensors")):
        run = path.parent.parent
        seed = RunDir(run).read_config()["seed"]  # the seed from the run's config, its name from the sweep's label
        name = run.name.removesuffix(f"-s{seed}")
        if name in STRATEGIES:
            runs[name][seed] = run
    structures = {(name, seed): structure_of(run) for name, by_seed in runs.items() for seed, run in by_seed.items()}

    print("### Across seeds (hidden neurons matched)\n")
    print("| strategy | pairs | layer | matched edge Jaccard | matched overlap | NNSTD | raw edge Jaccard |")
    print("|---|---|---|---|---|---|---|")
    for name, by_seed in runs.items():
        results = [similarity(structures[name, a], structures[name, b])
                   for a, b in itertools.combinations(sorted(by_seed), 2)]
        if not results:
            continue
        for index, layer in enumerate(results[0].layers):
            if not layer.sparse:
                continue
            column = {key: [getattr(r.layers[index], key) for r in results]
                      for key in ("matched_edge_jaccard", "matched_edge_overlap", "nnstd", "edge_jaccard")}
            print(f"| {STRATEGIES[name]} | {len(results)} | {layer.layer} | {stats(column['matched_edge_jaccard'])} "
                  f"| {stats(column['matched_edge_overlap'])} | {stats(column['nnstd'])} "
                  f"| {stats(column['edge_jaccard'])} |")
        print(f"| {STRATEGIES[name]} | {len(results)} | **overall** "
              f"| {stats([r.matched_edge_jaccard for r in results])} "
              f"| {stats([r.matched_edge_overlap for r in results])} | {stats([r.nnstd for r in results])} "
              f"| {stats([r.edge_jaccard for r in results])} |")

        # Chance level: random wirings with the same connections per layer, matched the same way.
        reference = structures[name, min(by_seed)]
        chance = [similarity(random_like(reference, 2 * k), random_like(reference, 2 * k + 1)) for k in range(2)]
        print(f"| {STRATEGIES[name]}: chance (random wiring, same counts) | {len(chance)} | overall "
              f"| {stats([r.matched_edge_jaccard for r in chance])} "
              f"| {stats([r.matched_edge_overlap for r in chance])} | {stats([r.nnstd for r in chance])} "
              f"| {stats([r.edge_jaccard for r in chance])} |")

    print("\n### Same seed, different strategies (raw: they start from the same network)\n")
    print("| pair | seeds | input Jaccard | edge Jaccard fc1 / fc2 / fc3 | overall edge Jaccard | overall overlap |")
    print("|---|---|---|---|---|---|")
    for left, right in PAIRS:
        seeds = sorted(set(runs.get(left, {})) & set(runs.get(right, {})))
        if not seeds:
            continue
        results = [similarity(structures[left, s], structures[right, s], match="none") for s in seeds]
        per_layer = " / ".join(f"{statistics.mean(r.layers[i].edge_jaccard for r in results):.3f}"
                               for i, layer in enumerate(results[0].layers) if layer.sparse)
        print(f"| {STRATEGIES[left]} vs {STRATEGIES[right]} | {len(seeds)} "
              f"| {stats([r.input_jaccard for r in results])} | {per_layer} "
              f"| {stats([r.edge_jaccard for r in results])} | {stats([r.edge_overlap for r in results])} |")

    settling = folder.parent / "settling"
    if settling.is_dir():
        print("\n### How long grown connections live (runs with --save-topology-every 1)\n")
        print("| run | grown connections alive one step later, per step | final connections that are initial "
              "| edge Jaccard, consecutive epochs |")
        print("|---|---|---|---|")
        for run in sorted(settling.iterdir()):
            print(survival(run))

    heat = [runs[name][seed] for name in ("synthesis-full", "random-full") for seed in sorted(runs.get(name, {}))]
    if len(heat) >= 2:
        for path in write_matrix(heat, figures / "similarity-matched", match="hungarian"):
            print(f"wrote {path}", file=sys.stderr)
        for path in write_matrix(heat, figures / "similarity-raw", match="none"):
            print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("runs/reference/e10"),
         Path(sys.argv[2]) if len(sys.argv) > 2 else Path("docs/figures"))
