"""The command line end to end on digits: run directory, resume, figures, help, bad input."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

import synthprune
import synthprune.train
from synthprune.cli import app, main
from synthprune.runs import load_run_model

QUICK = ["--preset", "digits-mlp", "--epochs", "3", "--quiet"]


def rows(run):
    with (run / "metrics.csv").open() as handle:
        return list(csv.DictReader(handle))


def test_train_through_typer_writes_the_run_directory(tmp_path):
    run = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", *QUICK, "--grow", "synthesis", "--out", str(run)])
    assert result.exit_code == 0, result.output
    for name in ("config.yaml", "metrics.csv", "topology.jsonl", "checkpoint.pt", "final/model.safetensors",
                 "final/config.json", "figures/accuracy.png", "figures/connections.png",
                 "figures/input_connectivity.png"):
        assert (run / name).is_file(), name
    assert "test acc" in result.output and "compression" in result.output

    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["grow"] == "synthesis" and config["epochs"] == 3 and config["dataset"] == "digits"
    metrics = rows(run)
    assert [int(r["epoch"]) for r in metrics] == [1, 2, 3]
    for column in ("train_loss", "train_accuracy", "test_accuracy", "connections", "connections_fc1",
                   "connections_fc3", "live_1", "live_2", "epoch_seconds", "rewire_seconds"):
        assert column in metrics[0]
    assert float(metrics[-1]["test_accuracy"]) > 0.8
    assert int(metrics[0]["connections"]) == 5 * (64 + 128) + 5 * (128 + 128) + 128 * 10
    lines = [json.loads(line) for line in (run / "topology.jsonl").read_text().splitlines()]
    assert len(lines) == 2 * 2  # 2 rewiring steps (none after the last epoch) x 2 sparse layers
    assert {"pruned", "grown", "fallbacks", "top_decile_share", "density"} <= set(lines[0])

    checkpoint = torch.load(run / "checkpoint.pt", weights_only=True)
    assert checkpoint["epoch"] == 3 and {"model", "optimizer", "rewirer", "rng"} <= set(checkpoint)
    tensors = load_file(run / "final" / "model.safetensors")
    assert "fc1.col_indices" in tensors and "fc1.values" in tensors  # the wiring is in the file
    model, _ = load_run_model(run)
    assert model.fc1.nnz == int(metrics[-1]["connections_fc1"])


def interrupt_after_epoch(monkeypatch, epoch, evaluations_per_epoch=1):
    """Make evaluation raise KeyboardInterrupt in epoch ``epoch + 1``, as Ctrl-C would."""
    real, calls = synthprune.train.evaluate, []

    def evaluate(*args, **kwargs):
        calls.append(1)
        if len(calls) == epoch * evaluations_per_epoch + 1:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(synthprune.train, "evaluate", evaluate)


@pytest.mark.parametrize("extra", [
    [], ["--compress-to", "0.05", "--accuracy-guard", "0.5"],
    ["--rewire-every", "15", "--grow", "gradient", "--compress-to", "0.05"],
    ["--set", "model=cnn", "--set", "hidden=[32]", "--set", "density=0.3", "--rewire-every", "20",
     "--compress-to", "0.1"],
], ids=["rewiring", "compression", "every-15-steps", "cnn"])
def test_resume_equals_an_uninterrupted_run(tmp_path, monkeypatch, capsys, extra):
    config = tmp_path / "c.yaml"
    config.write_text("dropout: 0.2\n")  # dropout: the resumed run must restore the RNG too
    args = ["train", *QUICK, "--epochs", "4", "--config", str(config), "--no-plots", *extra]
    assert main([*args, "--out", str(tmp_path / "whole")]) == 0

    interrupt_after_epoch(monkeypatch, 2, evaluations_per_epoch=2 if "--accuracy-guard" in extra else 1)
    assert main([*args, "--out", str(tmp_path / "cut")]) == 130
    assert "--resume" in capsys.readouterr().err
    assert len(rows(tmp_path / "cut")) == 2 and not (tmp_path / "cut" / "final").exists()
    monkeypatch.undo()
    assert main(["train", "--resume", "--quiet", "--no-plots", "--out", str(tmp_path / "cut")]) == 0

    strip = lambda table: [{k: v for k, v in r.items() if not k.endswith("seconds")} for r in table]
    assert strip(rows(tmp_path / "whole")) == strip(rows(tmp_path / "cut"))
    whole = load_file(tmp_path / "whole" / "final" / "model.safetensors")
    cut = load_file(tmp_path / "cut" / "final" / "model.safetensors")
    assert whole.keys() == cut.keys()
    for key in whole:
        assert torch.equal(whole[key], cut[key]), key
    if "--rewire-every" in extra:  # rewired inside the epochs, and recorded with the optimizer step
        steps = {json.loads(line)["optimizer_step"] for line in (tmp_path / "cut" / "topology.jsonl").open()}
        every = int(extra[extra.index("--rewire-every") + 1])
        assert steps == set(range(every, 4 * 45, every))  # 45 optimizer steps per epoch, none after the last


@pytest.mark.parametrize("backend", ["dense", "masked"])
def test_dense_and_masked_backends_train(tmp_path, backend):
    run = tmp_path / backend
    assert main(["train", *QUICK, "--epochs", "2", "--backend", backend, "--no-plots", "--out", str(run)]) == 0
    metrics = rows(run)
    if backend == "dense":
        assert int(metrics[0]["connections"]) == 64 * 128 + 128 * 128 + 128 * 10
        assert (run / "topology.jsonl").read_text() == ""
    assert float(metrics[-1]["test_accuracy"]) > 0.5


def test_compression_reaches_its_target_and_records_validation(tmp_path):
    run = tmp_path / "c"
    assert main(["train", *QUICK, "--epochs", "5", "--compress-to", "0.04", "--compress-end", "3",
                 "--accuracy-guard", "50", "--no-plots", "--out", str(run)]) == 0
    metrics = rows(run)
    sparse = [int(r["connections_fc1"]) + int(r["connections_fc2"]) for r in metrics]
    assert sparse[3] == sparse[4] == round(0.04 * (64 * 128 + 128 * 128))  # reached after epoch 3
    assert sparse[0] > sparse[1] > sparse[2] > sparse[3]
    assert all(0 < float(r["validation_accuracy"]) <= 1 and r["compression_paused"] == "0" for r in metrics)
    lines = [json.loads(line) for line in (run / "topology.jsonl").read_text().splitlines()]
    assert all(line["connections"] == line["target"] for line in lines)
    assert sum(line["pruned"] - line["grown"] for line in lines) == sparse[0] - sparse[-1]


def test_accuracy_guard_pauses_compression(tmp_path, monkeypatch):
    # Validation accuracy that falls every epoch: the guard must hold the count from epoch 2 on.
    real, calls = synthprune.train.evaluate, []

    def evaluate(model, x, y, *args, **kwargs):
        calls.append(1)
        return real(model, x, y) if len(calls) % 2 else 1.0 - 0.1 * len(calls)

    monkeypatch.setattr(synthprune.train, "evaluate", evaluate)
    run = tmp_path / "g"
    assert main(["train", *QUICK, "--epochs", "4", "--compress-to", "0.04", "--accuracy-guard", "1",
                 "--no-plots", "--out", str(run)]) == 0
    metrics = rows(run)
    assert [r["compression_paused"] for r in metrics] == ["0", "1", "1", "1"]
    assert metrics[1]["connections"] == metrics[2]["connections"] == metrics[3]["connections"]


def test_static_sparse_keeps_its_wiring(tmp_path):
    run = tmp_path / "static"
    assert main(["train", *QUICK, "--grow", "none", "--no-plots", "--out", str(run)]) == 0
    lines = [json.loads(line) for line in (run / "topology.jsonl").read_text().splitlines()]
    assert all(line["pruned"] == line["grown"] == 0 for line in lines)


def test_plot_overlays_several_runs(tmp_path):
    for grow in ("random", "synthesis"):
        assert main(["train", *QUICK, "--epochs", "2", "--grow", grow, "--no-plots",
                     "--out", str(tmp_path / grow)]) == 0
    assert main(["plot", str(tmp_path / "random"), str(tmp_path / "synthesis"), "--out", str(tmp_path / "f")]) == 0
    assert {p.name for p in (tmp_path / "f").iterdir()} == {"accuracy.png", "connections.png",
                                                             "input_connectivity.png"}


COMMANDS = ["train", "plot", "list", "residual", "export", "sweep", "similarity", "bench"]


@pytest.mark.parametrize("command", [[], *([c] for c in COMMANDS)])
def test_help_for_every_command(command, capsys):
    assert main([*command, "--help"]) == 0
    out = capsys.readouterr().out
    assert "Usage" in out and "synthprune" in out


def test_list_names_strategies(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "synthesis" in out and "kappa_end" in out and "fmnist-mlp" in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--preset", "cifar-mlp"], "unknown preset 'cifar-mlp'; valid: fmnist-mlp, fmnist-cnn, digits-mlp"),
        (["--zeta", "1.5"], r"zeta must be in (0, 1), got 1.5"),
        (["--epochs", "0"], "epochs must be >= 1, got 0"),
        (["--epochs", "many"], "Invalid value for '--epochs'"),
        (["--backend", "coo"], "unknown --backend 'coo'; valid: csr, masked, dense"),
        (["--grow", "magic"], "unknown --grow 'magic'; valid: gradient, none, random, synthesis"),
        (["--epsilon", "-1"], "epsilon must be > 0, got -1.0"),
        (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--device", "tpu"], "device"),
        (["--data-dir", "/nonexistent"], "Fashion-MNIST not found in /nonexistent"),
        (["--out", "/proc/synthprune-test"], "cannot write to run directory /proc/synthprune-test"),
        (["--resume"], "--resume needs --out"),
        (["--resume", "--epochs", "9", "--out", "x"], "saved config.yaml; drop --epochs"),
        (["--compress-to", "0.5"], "compression only shrinks"),
        (["--compress-to", "100", "--compress-scope", "layer"], "fewer than its 128 output neurons"),
        (["--compress-to", "1e9x"], "--compress-to must be a density below 1 or a connection count"),
        (["--compress-to", "0.01", "--backend", "dense"], "--compress-to needs a sparse backend"),
        (["--compress-to", "0.01", "--compress-end", "10"], "compress_end <= epochs - 1"),
        (["--compress-to", "0.05", "--compress-scope", "all"], "unknown --compress-scope 'all'"),
        (["--accuracy-guard", "1"], "--accuracy-guard shapes compression, which is off"),
        (["--compress-to", "0.05", "--accuracy-guard", "1", "--validation-split", "0"], "validation_split > 0"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    preset = [] if "--preset" in args or "--data-dir" in args else ["--preset", "digits-mlp"]
    assert main(["train", *preset, "--quiet", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert "Traceback" not in err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())  # a refused run leaves nothing


def test_refuses_to_overwrite_a_run_and_to_resume_a_finished_one(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *QUICK, "--epochs", "1", "--no-plots", "--out", str(run)]) == 0
    assert main(["train", *QUICK, "--epochs", "1", "--out", str(run)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert main(["train", "--resume", "--out", str(run)]) == 2
    assert "already finished" in capsys.readouterr().err


def test_corrupt_checkpoint_is_reported(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    interrupt_after_epoch(monkeypatch, 1)
    assert main(["train", *QUICK, "--out", str(run)]) == 130
    (run / "checkpoint.pt").write_bytes(b"garbage")
    assert main(["train", "--resume", "--out", str(run)]) == 2
    assert "cannot load" in capsys.readouterr().err


def test_nan_loss_stops_with_a_clear_error(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *QUICK, "--lr", "1e12", "--out", str(run)]) == 1
    err = capsys.readouterr().err
    assert "loss became" in err and "lower --lr" in err and "Traceback" not in err


def test_residual_and_onnx_export_of_a_compressed_run(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *QUICK, "--compress-to", "0.02", "--no-plots", "--out", str(run)]) == 0
    capsys.readouterr()
    assert main(["residual", str(run)]) == 0
    out = capsys.readouterr().out
    assert "neurons: hidden 1" in out and "bytes on disk" in out and "compression vs dense" in out
    info = json.loads((run / "final" / "residual" / "config.json").read_text())
    assert info["sizes"][0] == len(info["kept_inputs"]) and info["sizes"][-1] == 10
    assert info["summary"]["neurons_after"] == info["sizes"]

    model, _ = load_run_model(run)
    residual = synthprune.load_residual(run)  # a run directory means its final/residual
    x = torch.randn(50, 64)
    torch.testing.assert_close(residual(x), model.eval()(x), atol=1e-5, rtol=1e-5)

    pytest.importorskip("onnx", reason="the [onnx] extra is not installed")
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
    assert main(["export", str(run), "--onnx"]) == 0
    assert "computed sparse" in capsys.readouterr().out  # what became of the weights
    session = ort.InferenceSession(str(run / "final" / "residual" / "model.onnx"))
    for batch in (1, 37):  # the batch dimension is dynamic
        x = torch.randn(batch, 64)
        (logits,) = session.run(None, {"input": x.numpy()})
        np.testing.assert_allclose(logits, residual(x).detach().numpy(), atol=1e-5, rtol=1e-5)
    sizes = {}
    for form in ("dense", "sparse"):
        assert main(["export", str(run), "--onnx", "--onnx-form", form, "--out", str(tmp_path / f"{form}.onnx")]) == 0
        sizes[form] = (tmp_path / f"{form}.onnx").stat().st_size
    assert sizes["sparse"] < sizes["dense"] / 3
    assert main(["export", str(run), "--onnx", "--onnx-form", "csr"]) == 2
    assert "--onnx-form must be one of auto, sparse, densify, dense" in capsys.readouterr().err


def test_residual_and_export_refuse_unfinished_runs_and_bad_options(tmp_path, capsys):
    assert main(["residual", str(tmp_path)]) == 2
    assert "unfinished run" in capsys.readouterr().err
    assert main(["export", str(tmp_path)]) == 2
    assert "--onnx" in capsys.readouterr().err
    assert main(["residual", str(tmp_path), "--form", "coo"]) == 2
    assert "unknown form" in capsys.readouterr().err


def test_yaml_numbers_in_exponent_notation_are_numbers(tmp_path, capsys):
    # Regression: PyYAML reads `1e-3` as a string; validation then failed with a TypeError.
    from synthprune.config import load_config

    config = tmp_path / "c.yaml"
    config.write_text("lr: 1e-3\nweight_decay: 5e-4\n")
    assert load_config("digits-mlp", config).lr == 0.001
    config.write_text("lr: fast\n")
    assert main(["train", "--preset", "digits-mlp", "--config", str(config), "--quiet"]) == 2
    assert "lr must be a number, got 'fast'" in capsys.readouterr().err


def test_the_command_line_waits_passively_unless_told_otherwise():
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    script = str(Path(sys.executable).with_name("synthprune"))
    for command in ([sys.executable, "-m", "synthprune", "list"], [script, "list"]):
        out = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
        assert "OpenMP wait policy PASSIVE" in out, out  # set before torch loaded its OpenMP runtime
    out = subprocess.run([sys.executable, "-m", "synthprune", "list"], env={**env, "OMP_WAIT_POLICY": "ACTIVE"},
                         capture_output=True, text=True, check=True).stdout
    assert "OpenMP wait policy ACTIVE" in out  # the user's choice stands


def test_threads_sets_torchs_thread_count(tmp_path):
    before = torch.get_num_threads()
    try:
        args = ["train", *QUICK, "--epochs", "1", "--threads", "1", "--no-plots", "--out", str(tmp_path / "r")]
        assert main(args) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
