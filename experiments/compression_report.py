"""Summarise the runs of experiments/compression.yaml (each read from its own config): a Markdown
table (mean ± std over seeds) on stdout and the accuracy-vs-connections figure for docs/RESULTS.md.

    python experiments/compression_report.py [RUNS_FOLDER] [FIGURE]
    (default: runs/reference/e10 and docs/figures/compression.png)
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from synthprune.experiments import mean_std
from synthprune.plots import accuracy_vs_connections
from synthprune.residual import residual_network
from synthprune.runs import load_run_model

NAMES = {"synthesis": "synthesis", "random": "SET (random)", "none": "static", "dense": "dense",
         "synthesis_tail": "synthesis (tail)", "gradient": "RigL"}
COLORS = {"synthesis": "tab:orange", "random": "tab:blue", "none": "tab:gray", "synthesis_tail": "tab:red",
          "gradient": "tab:green"}


def main(folder: Path, figure: Path) -> None:
    records = []
    for info_path in sorted(folder.glob("*/final/config.json")):
        info = json.loads(info_path.read_text())
        model, config = load_run_model(info_path.parent.parent)  # what the run was, from its own config
        grow = "dense" if not config.sparse else config.grow
        if grow == "synthesis" and config.endpoint == "tail":
            grow = "synthesis_tail"
        target = "full" if config.compress_to is None else str(config.compress_to)
        seed = config.seed
        _, residual = residual_network(model.eval())
        records.append({
            "grow": grow, "target": target, "seed": int(seed), "summary": info["summary"], "residual": residual,
        })
    if not records:
        sys.exit(f"no finished runs in {folder}")

    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for record in records:
        groups[(record["grow"], record["target"])].append(record)
    order = {"dense": 0, "none": 1, "random": 2, "gradient": 3, "synthesis": 4, "synthesis_tail": 5}
    print("| strategy | compress to | seeds | final test acc % | best test acc % | connections (trained) "
          "| residual connections | live neurons h1 / h2 / h3 | kept inputs | × fewer parameters than dense |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    points = []
    for (grow, target), runs in sorted(groups.items(), key=lambda kv: (order.get(kv[0][0], 9),
                                                                       -float(kv[0][1].replace("full", "1")))):
        residuals = [r["residual"] for r in runs]
        live = [statistics.mean(r.neurons_after[level] for r in residuals)
                for level in range(1, len(residuals[0].neurons_after) - 1)]
        print(f"| {NAMES.get(grow, grow)} | {'-' if target == 'full' else f'{100 * float(target):g}%'} "
              f"| {len(runs)} "
              f"| {mean_std([r['summary']['final_test_accuracy'] for r in runs], 100)} "
              f"| {mean_std([r['summary']['best_test_accuracy'] for r in runs], 100)} "
              f"| {statistics.mean(r['summary']['connections'] for r in runs):,.0f} "
              f"| {statistics.mean(sum(r.connections_after) for r in residuals):,.0f} "
              f"| {' / '.join(f'{n:,.0f}' for n in live)} "
              f"| {statistics.mean(r.neurons_after[0] for r in residuals):,.0f} "
              f"| {statistics.mean(r.dense_parameters / r.parameters_after for r in residuals):.1f} |")
        label = NAMES.get(grow, grow) + (" + compression" if target != "full" else "")
        if grow == "dense":
            continue  # 2.8M connections: off the scale of the figure; in the table
        for run, res in zip(runs, residuals, strict=True):
            points.append({"group": label if target != "full" else f"{NAMES.get(grow, grow)} (fixed budget)",
                           "color": COLORS.get(grow, "black"), "marker": "o" if target != "full" else "*",
                           "markersize": 6 if target != "full" else 11,
                           "setting": target, "connections": sum(res.connections_after),
                           "accuracy": run["summary"]["final_test_accuracy"]})
    epochs = {r["summary"]["epochs"] for r in records}
    path = accuracy_vs_connections(
        points, figure, title=f"Fashion-MNIST MLP, {'/'.join(map(str, sorted(epochs)))} epochs: "
                              "accuracy vs residual connections")
    print(f"\nfigure: {path}", file=sys.stderr)


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("runs/reference/e10"),
         Path(sys.argv[2]) if len(sys.argv) > 2 else Path("docs/figures/compression.png"))
