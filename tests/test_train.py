"""fit() directly, without the command line: records, resume, the guard, validation, NaN."""

import pytest
import torch
from safetensors.torch import load_file

import synthprune.train
from synthprune.config import load_config
from synthprune.rundir import RunDir
from synthprune.runs import build_model
from synthprune.train import TrainingError, accuracy_guard, build_rewirer, fit, split_validation


def quiet(line):
    pass


def test_fit_writes_a_finished_run_and_returns_its_summary(tmp_path):
    summary = fit(load_config("digits-mlp", epochs=3), tmp_path / "run", log=quiet)
    run = RunDir(tmp_path / "run")
    assert run.is_finished() and len(run.read_metrics()) == 3
    assert summary["epochs"] == 3 and summary["connections"] == run.read_metrics()[-1]["connections"]
    assert 0 < summary["final_test_accuracy"] <= 1 and all(0 < n <= 128 for n in summary["live_neurons"])
    topology = run.topology.read_text().splitlines()
    assert len(topology) == 2 * 2  # two rewiring steps (none after the last epoch) x two sparse layers


def test_an_interrupted_fit_resumes_to_the_same_weights(tmp_path, monkeypatch):
    config = load_config("digits-mlp", epochs=4, grow="synthesis", compress_to=0.05)
    fit(config, tmp_path / "whole", log=quiet)
    real, calls = synthprune.train.evaluate, []

    def evaluate(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # during epoch 3's evaluation: epochs 1 and 2 are checkpointed
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(synthprune.train, "evaluate", evaluate)
    with pytest.raises(KeyboardInterrupt):
        fit(config, tmp_path / "cut", log=quiet)
    monkeypatch.undo()
    assert len(RunDir(tmp_path / "cut").read_metrics()) == 2
    fit(config, tmp_path / "cut", resume=True, log=quiet)
    a, b = (load_file(str(tmp_path / name / "final" / "model.safetensors")) for name in ("whole", "cut"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_nan_loss_stops_before_the_optimizer_step_and_keeps_the_folder_reusable(tmp_path):
    with pytest.raises(TrainingError, match="no epoch finished"):
        fit(load_config("digits-mlp", lr=1e12), tmp_path / "run", log=quiet)
    assert RunDir(tmp_path / "run").is_unstarted()
    fit(load_config("digits-mlp", epochs=1), tmp_path / "run", log=quiet)  # the next start reuses it


def test_the_guard_pauses_while_validation_is_too_far_below_its_best():
    lines = []
    history = [{"validation_accuracy": 0.90}]
    assert accuracy_guard(None, history, {"validation_accuracy": 0.5}, lines.append) == {}
    assert accuracy_guard(2.0, history, {"validation_accuracy": 0.89}, lines.append) == {"compression_paused": 0}
    assert accuracy_guard(2.0, history, {"validation_accuracy": 0.87}, lines.append) == {"compression_paused": 1}
    assert len(lines) == 1 and "compression paused" in lines[0]


@pytest.mark.parametrize("n, fraction", [(100, 0.1), (1437, 0.25), (10, 0.0)])
def test_validation_is_held_out_once_and_is_the_same_for_a_seed(n, fraction):
    train, held_out = split_validation(n, fraction, seed=3)
    assert len(held_out) == round(fraction * n) and len(train) + len(held_out) == n
    assert set(train.tolist()).isdisjoint(held_out.tolist())
    assert torch.equal(split_validation(n, fraction, seed=3)[1], held_out)
    with pytest.raises(ValueError, match="leaves no validation"):
        split_validation(3, 0.01, seed=0)


def test_the_rewirer_of_a_config_counts_steps_from_zero():
    config = load_config("digits-mlp", epochs=6, compress_to=0.05, compress_start=2, compress_end=4)
    model = build_model(config, 64, 10)
    rewirer = build_rewirer(config, model, torch.optim.SGD(model.parameters(), lr=0.1), 1437)
    assert (rewirer.compress_start, rewirer.compress_end) == (1, 3)  # after epochs 2..4 = steps 1..3
    assert rewirer.total_steps == 5 and rewirer.rewire_schedule is None
    dense = load_config("digits-mlp", backend="dense")
    assert build_rewirer(dense, build_model(dense, 64, 10), None, 1437) is None


def test_step_based_rewiring_maps_compression_epochs_to_the_steps_inside_them():
    # 1437 examples in batches of 32: 45 optimizer steps per epoch, 270 in 6 epochs.
    config = load_config("digits-mlp", epochs=6, compress_to=0.05, compress_start=2, compress_end=4, rewire_every=20)
    model = build_model(config, 64, 10)
    rewirer = build_rewirer(config, model, torch.optim.SGD(model.parameters(), lr=0.1), 1437)
    assert rewirer.rewire_schedule.every == 20 and rewirer.total_steps == 13  # steps 20, 40, ..., 260
    # epoch 2 holds steps 46..90: the 3rd rewiring (60) is its first; epoch 4 ends at step 180: the 9th
    assert (rewirer.compress_start, rewirer.compress_end) == (2, 8)
    until = load_config("digits-mlp", epochs=6, rewire_until=100)  # per epoch: after epochs 1 and 2 only
    assert build_rewirer(until, build_model(until, 64, 10), None, 1437).total_steps == 2
    with pytest.raises(ValueError, match=r"rewire_every.*leaves no rewiring step"):
        none_left = load_config("digits-mlp", epochs=2, rewire_every=500)
        build_rewirer(none_left, build_model(none_left, 64, 10), None, 1437)
