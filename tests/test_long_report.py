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


def test_compressed_runs_pair_with_set_static_and_synthesis_at_their_budget(tmp_path):
    module = report()
    assert module.references("synthesis-c0.002") == {"random-c0.002": "SET at the budget",
                                                     "static-final-0.002": "static at the budget",
                                                     "synthesis-c0.002": "synthesis at the budget"}
    assert module.references("static-final-0.01")["random-c0.01"] == "SET at the budget"
    assert module.references("synthesis-full") == module.REFERENCES
    for seed, (ours, theirs) in enumerate([(0.80, 0.78), (0.82, 0.79)]):
        write_run(tmp_path, f"synthesis-c0.01-s{seed}", [(ours, 0.7)])
        write_run(tmp_path, f"static-final-0.01-s{seed}", [(theirs, 0.7)])
    table = module.table(module.read(tmp_path))
    assert "paired vs static at the budget" in table
    row = next(line for line in table.splitlines() if line.startswith("| synthesis-c0.01 "))
    assert row.endswith("| — | 2.50 ± 6.35 | — |")  # +2 and +3 points over two seeds, t-interval


def similarity_power():
    spec = importlib.util.spec_from_file_location(
        "similarity_power_report", ROOT / "experiments" / "similarity_power_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_similarity_power_measures_on_a_hand_made_wiring():
    import torch

    from synthprune.wiring import Structure

    module = similarity_power()
    widths = [4, 3, 2]

    def structure(first, second):
        return Structure("s", widths, [torch.tensor(first), torch.tensor(second)], [True, False])

    initial = structure([0, 1, 5, 6], [0, 1, 2, 3, 4, 5])
    a = structure([0, 1, 5, 9], [0, 1, 2, 3, 4, 5])  # keeps 0, 1, 5 of the initial, grows 9
    b = structure([0, 1, 6, 10], [0, 1, 2, 3, 4, 5])  # keeps 0, 1, 6, grows 10
    measures = module.pair_measures(a, b, initial)
    layer = measures["layers"][0]
    assert layer["edge_jaccard"] == pytest.approx(2 / 6)
    assert layer["initial_share"] == pytest.approx(6 / 8)
    # at best the grown connections coincide: 2 shared initial + 1 grown over a union of 5
    assert layer["ceiling"] == pytest.approx(3 / 5)
    assert layer["grown_jaccard"] == 0.0
    assert layer["grown_chance"] == pytest.approx(module.chance_jaccard(1, 1, 12 - 4))
    pixels = measures["nodes"][0]  # a reads inputs {0, 1}, b reads {0, 1, 2}
    assert pixels["level"] == "pixels" and pixels["jaccard"] == pytest.approx(2 / 3)
    assert module.chance_jaccard(10, 10, 10) == 1.0 and module.chance_jaccard(0, 0, 10) == 1.0


def test_a_compressing_run_is_chosen_at_its_budget(tmp_path):
    # Bug: the best validation epoch of gradual pruning from dense came long before the run
    # reached its budget, so the table scored a network with 20x the connections.
    (tmp_path / "gmp-c0.01-s0").mkdir()
    (tmp_path / "gmp-c0.01-s0" / "metrics.csv").write_text(
        "epoch,test_accuracy,validation_accuracy,connections\n"
        "1,0.89,0.90,800000\n2,0.86,0.85,37840\n3,0.87,0.86,37840\n")
    module = report()
    assert module.chosen(module.read(tmp_path)["gmp-c0.01"][0]) == pytest.approx(0.87)


def test_the_tuning_report_chooses_each_rule_on_validation(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("tuning_report", ROOT / "experiments" / "tuning_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    base, tuning = tmp_path / "base", tmp_path / "tuning"
    write_run(base, "random-full-s0", [(0.88, 0.890)])
    write_run(tuning, "random-zeta0.1-s0", [(0.87, 0.895)])  # best on validation, worse on test
    write_run(tuning, "random-zeta0.5-s0", [(0.90, 0.880)])  # best on test: never chosen
    module.main(tuning, base)
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| SET")]
    chosen = [line for line in rows if "**yes**" in line]
    assert len(chosen) == 1 and "| zeta0.1 |" in chosen[0]
    assert any("settings not run yet" in line for line in rows)
    # the tuned setting on test, paired by seed with the rule's reference settings
    write_run(tuning, "random-zeta0.1-s1", [(0.89, 0.90)])
    write_run(base, "random-full-s1", [(0.88, 0.91)])
    module.main(tuning, base)
    tuned = [line for line in capsys.readouterr().out.splitlines()
             if line.startswith("| SET (random) | random-zeta0.1")]
    assert tuned == ["| SET (random) | random-zeta0.1 | 2 | 88.00 ± 12.71 | 0.00 ± 12.71 | — |"]


def test_connectivity_counts_each_pixels_first_layer_connections(tmp_path):
    import torch

    import synthprune
    from synthprune.wiring import save_snapshot

    spec = importlib.util.spec_from_file_location("connectivity_report",
                                                  ROOT / "experiments" / "connectivity_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = synthprune.SparseMLP([784, 20, 10], epsilon=5, seed=0)
    save_snapshot(model, tmp_path / "wiring.safetensors", epoch=1)
    grid = module.degrees(tmp_path)
    assert grid.shape == (28, 28)
    expected = torch.bincount(model.fc1.edge_index()[1], minlength=784).reshape(28, 28).numpy()
    assert (grid == expected).all() and grid.sum() == model.fc1.nnz


def build_report():
    spec = importlib.util.spec_from_file_location("build_report", ROOT / "experiments" / "build_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_splice_replaces_only_between_its_markers():
    module = build_report()
    text = "prose\n<!-- generated: t -->\nold\n<!-- end: t -->\nmore prose\n"
    expected = "prose\n<!-- generated: t -->\nnew\ntable\n<!-- end: t -->\nmore prose\n"
    assert module.splice(text, "t", "new\ntable") == expected
    with pytest.raises(ValueError, match="'u'"):
        module.splice(text, "u", "x")


def test_the_results_tables_are_what_the_committed_records_give():
    # docs/RESULTS.md's generated tables against experiments/results, figures to a scratch folder
    assert build_report().main(check=True) == 0
