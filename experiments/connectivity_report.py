"""Input connectivity under each input scaling (issue 16, item 6), from committed records: the
number of first-layer connections each pixel keeps at the end of a run, as a 28 x 28 image,
for every record whose configuration names a growth rule and a scaling (the reference runs of
long.yaml use global scaling; tuning.yaml's `-pixel` and `-unit` variants the others).

    python experiments/connectivity_report.py [FIGURE]
    (default: docs/figures/input_connectivity.png)

Prints, per record, how many pixels keep no connection and the share of connections on the
outer 3-pixel border (which is always black in Fashion-MNIST).
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib
import numpy as np
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from synthprune.wiring import load_snapshot

RESULTS = Path(__file__).resolve().parent / "results"
RULES = ("random", "synthesis", "synthesis_tail", "gradient")
SCALINGS = {"global": "long-e60/{rule}-full-s0", "pixel": "tuning-e60/{rule}-pixel-s0",
            "unit": "tuning-e60/{rule}-unit-s0"}
SIDE = 28


def degrees(record: Path) -> np.ndarray:
    """Connections per input pixel of the first layer, ``[28, 28]``."""
    structure = load_snapshot(record / "wiring.safetensors")
    cols = (structure.keys[0] % structure.widths[0]).numpy()
    return np.bincount(cols, minlength=structure.widths[0]).reshape(SIDE, SIDE)


def main(figure: Path) -> None:
    found = {(rule, scaling): RESULTS / pattern.format(rule=rule) for rule in RULES
             for scaling, pattern in SCALINGS.items()}
    found = {key: path for key, path in found.items() if (path / "wiring.safetensors").is_file()}
    if not found:
        sys.exit(f"no records with a final wiring under {RESULTS}")
    border = np.ones((SIDE, SIDE), dtype=bool)
    border[3:-3, 3:-3] = False
    print("| rule | scaling | pixels without connections | share of connections on the 3-pixel border |")
    print("|---|---|---|---|")
    rules = [rule for rule in RULES if any(r == rule for r, _ in found)]
    fig, axes = plt.subplots(len(rules), len(SCALINGS), figsize=(3 * len(SCALINGS), 3 * len(rules)), squeeze=False)
    for row, rule in enumerate(rules):
        for col, scaling in enumerate(SCALINGS):
            ax = axes[row][col]
            ax.set_xticks([])
            ax.set_yticks([])
            if (rule, scaling) not in found:
                ax.set_title(f"{rule}, {scaling}: not run yet", fontsize=8)
                continue
            grid = degrees(found[rule, scaling])
            print(f"| {rule} | {scaling} | {int((grid == 0).sum())} | {grid[border].sum() / grid.sum():.1%} |")
            image = ax.imshow(grid, cmap="viridis")
            ax.set_title(f"{rule}, {scaling} scaling", fontsize=9)
            fig.colorbar(image, ax=ax, fraction=0.046)
    fig.suptitle("First-layer connections per pixel at the end (seed 0)")
    figure.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(figure, dpi=100)
    plt.close(fig)
    print(f"\nfigure: {figure}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("docs/figures/input_connectivity.png"))
