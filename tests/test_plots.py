"""Figures that do not need a run directory."""

from synthprune.plots import accuracy_vs_connections


def test_accuracy_vs_connections_averages_seeds(tmp_path):
    points = [{"group": "synthesis + compression", "setting": t, "connections": c + seed, "accuracy": a}
              for seed in range(3) for t, c, a in (("0.02", 60_000, 0.84), ("0.01", 35_000, 0.83))]
    points.append({"group": "SET (fixed budget)", "connections": 125_000, "accuracy": 0.85, "marker": "*"})
    path = accuracy_vs_connections(points, tmp_path / "f" / "a.png", title="t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
