"""experiments/long_report.py: model selection on validation and paired intervals by seed, from
records alone."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def report():
    spec = importlib.util.spec_from_file_location("long_report", ROOT / "experiments" / "long_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_run(folder: Path, name: str, rows: list[tuple[float, float]]) -> None:
    (folder / name).mkdir(parents=True)
    lines = ["epoch,test_accuracy,validation_accuracy"] + [f"{e},{t},{v}" for e, (t, v) in enumerate(rows, start=1)]
    (folder / name / "metrics.csv").write_text("\n".join(lines) + "\n")


def test_the_report_chooses_on_validation_and_pairs_by_seed(tmp_path):
    # SET: test 0.80 at its best validation epoch (seed 0), 0.82 (seed 1); synthesis: +0.01 and +0.03.
    write_run(tmp_path, "random-full-s0", [(0.80, 0.70), (0.95, 0.60)])  # the best test is not chosen
    write_run(tmp_path, "random-full-s1", [(0.82, 0.71)])
    write_run(tmp_path, "synthesis-full-s0", [(0.81, 0.72)])
    write_run(tmp_path, "synthesis-full-s1", [(0.85, 0.73)])
    module = report()
    runs = module.read(tmp_path)
    assert module.chosen(runs["random-full"][0]) == 0.80
    text = module.table(runs)
    synthesis = next(line for line in text.splitlines() if line.startswith("| synthesis-full"))
    # paired differences 1 and 3 points: mean 2, half-width t(0.975, 1) * stdev / sqrt(2) = 12.71 * 1.414 / 1.414
    assert "| 2.00 ± 12.71 |" in synthesis
    assert "83.00 ± " in synthesis  # mean of 81 and 85
    module.curves(runs, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_one_seed_has_no_interval(tmp_path):
    write_run(tmp_path, "random-full-s0", [(0.80, 0.70)])
    assert "(1 seed, no CI)" in report().table(report().read(tmp_path))
    with pytest.raises(SystemExit):
        report().main(tmp_path / "empty", tmp_path / "x.png")
