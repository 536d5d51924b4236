"""Bad input of every kind: exit code 2, one line on stderr, naming the flag or the file.

One table of cases across train, resume, residual, export, similarity, plot and sweep. Each
case builds what it needs in a temporary folder from a finished digits run, damages one thing,
and runs the command line in-process.
"""

import json
import shutil

import pytest
import torch
import yaml

from synthprune.cli import main
from synthprune.config import load_config
from synthprune.train import fit


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 2-epoch digits run with a residual network and a topology snapshot."""
    run = tmp_path_factory.mktemp("finished") / "run"
    config = load_config("digits-mlp", epochs=2, save_topology_every=1)
    fit(config, run, log=lambda line: None)
    assert main(["residual", str(run)]) == 0
    return run


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """A digits run stopped after its first of 3 epochs (checkpoint, no final/)."""
    run = tmp_path_factory.mktemp("interrupted") / "run"
    fit(load_config("digits-mlp", epochs=1), run, log=lambda line: None)
    shutil.rmtree(run / "final")
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["epochs"] = 3  # as if it had been started for 3 epochs
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    state["config"]["epochs"] = 3
    torch.save(state, run / "checkpoint.pt")
    return run


def copy(source, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(source, target)
    return target


def edit_yaml(path, **changes):
    values = yaml.safe_load(path.read_text())
    values.update(changes)
    path.write_text(yaml.safe_dump(values))


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def config_file(tmp_path, text):
    return ["--config", str(write(tmp_path / "cfg.yaml", text))]


def digits(*args):
    return ["train", "--preset", "digits-mlp", "--quiet", "--no-plots", *args]


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# (id, build(tmp_path, finished, interrupted) -> argv, text the one line must hold)
CASES = [
    # --- train: flags
    ("epsilon-inf", lambda t, f, i: digits("--epsilon", "inf", "--out", str(t / "r")), "--epsilon must be"),
    ("epsilon-nan", lambda t, f, i: digits("--epsilon", "nan", "--out", str(t / "r")), "--epsilon must be"),
    ("lr-inf", lambda t, f, i: digits("--lr", "inf", "--out", str(t / "r")), "--lr must be a finite number"),
    ("zeta-nan", lambda t, f, i: digits("--zeta", "nan", "--out", str(t / "r")), "--zeta must be in (0, 1)"),
    ("seed-negative", lambda t, f, i: digits("--seed", "-1", "--out", str(t / "r")), "--seed must be in [0, "),
    ("seed-huge", lambda t, f, i: digits("--seed", str(2**70), "--out", str(t / "r")), "--seed must be in [0, "),
    ("device-tpu", lambda t, f, i: digits("--device", "tpu", "--out", str(t / "r")), "--device must be cpu"),
    ("device-mps", lambda t, f, i: digits("--device", "mps", "--out", str(t / "r")), "--device"),
    ("threads-zero", lambda t, f, i: digits("--threads", "0", "--out", str(t / "r")), "--threads"),
    ("rewire-every-zero", lambda t, f, i: digits("--rewire-every", "0", "--out", str(t / "r")), "--rewire-every"),
    ("rewire-until-zero", lambda t, f, i: digits("--rewire-until", "0", "--out", str(t / "r")), "--rewire-until"),
    ("rewire-every-too-rare", lambda t, f, i: digits("--rewire-every", "5000", "--epochs", "2", "--out",
                                                     str(t / "r")), "--rewire-every leaves no rewiring step"),
    ("model-unknown", lambda t, f, i: digits("--set", "model=rnn", "--out", str(t / "r")),
     "unknown --set model 'rnn'; valid: mlp, cnn"),
    ("density-above-one", lambda t, f, i: digits("--set", "density=2", "--out", str(t / "r")),
     "--set density must be in (0, 1]"),
    ("channels-zero", lambda t, f, i: digits("--set", "model=cnn", "--set", "channels=[0]", "--out", str(t / "r")),
     "--set channels must be a list of channel counts"),
    ("compress-start-alone", lambda t, f, i: digits("--compress-start", "2", "--out", str(t / "r")),
     "--compress-start shapes compression, which is off"),
    ("compress-end-alone", lambda t, f, i: digits("--compress-end", "1", "--out", str(t / "r")),
     "--compress-end shapes compression"),
    ("data-dir-with-digits", lambda t, f, i: digits("--data-dir", str(t), "--out", str(t / "r")),
     "--data-dir is for the fashion-mnist"),
    ("limit-train-one-class", lambda t, f, i: digits("--limit-train", "1", "--out", str(t / "r")),
     "the first 1 training examples of digits hold only class"),
    ("epochs-a-word", lambda t, f, i: digits(*config_file(t, "epochs: ten\n"), "--out", str(t / "r")),
     "cfg.yaml: epochs must be a whole number"),
    # --- train: --config files
    ("hidden-int", lambda t, f, i: digits(*config_file(t, "hidden: 5\n"), "--out", str(t / "r")),
     "cfg.yaml: hidden must be a list"),
    ("hidden-null", lambda t, f, i: digits(*config_file(t, "hidden: null\n"), "--out", str(t / "r")),
     "cfg.yaml: hidden must be given"),
    ("hidden-float", lambda t, f, i: digits(*config_file(t, "hidden: [1.5]\n"), "--out", str(t / "r")),
     "cfg.yaml: hidden must be a list"),
    ("kappa-end-inf", lambda t, f, i: digits(*config_file(t, "kappa_end: .inf\nendpoint: tail\n"),
                                             "--out", str(t / "r")), "cfg.yaml: kappa_end must be a finite"),
    ("kappa-start-nan", lambda t, f, i: digits(*config_file(t, "kappa_start: .nan\n"), "--out", str(t / "r")),
     "cfg.yaml: kappa_start must be a finite"),
    ("dropout-range", lambda t, f, i: digits(*config_file(t, "dropout: 1.5\n"), "--out", str(t / "r")),
     "cfg.yaml: dropout must be in [0, 1)"),
    ("bool-as-string", lambda t, f, i: digits(*config_file(t, "dense_output: 'yes'\n"), "--out", str(t / "r")),
     "cfg.yaml: dense_output must be true or false"),
    ("mps-in-yaml", lambda t, f, i: digits(*config_file(t, "device: mps\n"), "--out", str(t / "r")),
     "cfg.yaml: device"),
    ("unknown-key", lambda t, f, i: digits(*config_file(t, "seedz: 1\n"), "--out", str(t / "r")),
     "unknown config key(s) ['seedz']"),
    ("config-not-yaml", lambda t, f, i: digits(*config_file(t, "a: [1,\n"), "--out", str(t / "r")),
     "cfg.yaml: not valid YAML"),
    ("config-a-list", lambda t, f, i: digits(*config_file(t, "- 1\n- 2\n"), "--out", str(t / "r")),
     "cfg.yaml: must be a YAML mapping"),
    ("config-missing", lambda t, f, i: digits("--config", str(t / "nope.yaml"), "--out", str(t / "r")),
     "nope.yaml: not found"),
    # --- train --resume: the run's own files
    ("resume-config-edited-invalid", lambda t, f, i: _resume_after(t, i, lambda r: edit_yaml(r / "config.yaml",
                                                                                             zeta=3.0)),
     "config.yaml: zeta must be in (0, 1)"),
    ("resume-config-edited-other-run", lambda t, f, i: _resume_after(t, i, lambda r: edit_yaml(
        r / "config.yaml", hidden=[64, 64])), "config.yaml: hidden differ(s) from the run"),
    ("resume-config-not-yaml", lambda t, f, i: _resume_after(t, i, lambda r: write(r / "config.yaml", "a: [")),
     "config.yaml: not valid YAML"),
    ("resume-checkpoint-truncated", lambda t, f, i: _resume_after(t, i, lambda r: truncate(r / "checkpoint.pt")),
     "checkpoint.pt: cannot load it"),
    ("resume-checkpoint-foreign", lambda t, f, i: _resume_after(
        t, i, lambda r: torch.save({"weights": torch.zeros(3)}, r / "checkpoint.pt")),
     "checkpoint.pt: is not a synthprune checkpoint"),
    ("resume-checkpoint-not-a-dict", lambda t, f, i: _resume_after(
        t, i, lambda r: torch.save(torch.zeros(3), r / "checkpoint.pt")), "checkpoint.pt: holds a Tensor"),
    ("resume-checkpoint-wrong-epoch", lambda t, f, i: _resume_after(t, i, lambda r: _edit_checkpoint(r, epoch=7)),
     "checkpoint.pt: records do not add up"),
    ("resume-checkpoint-other-model", lambda t, f, i: _resume_after(t, i, lambda r: _edit_checkpoint(
        r, model={"fc1.values": torch.zeros(3)})), "checkpoint.pt: does not fit this run's model"),
    # --- residual / export: a finished run's final files
    ("residual-final-truncated", lambda t, f, i: ["residual", str(_damaged(
        t, f, lambda r: truncate(r / "final" / "model.safetensors")))], "model.safetensors: not a readable"),
    ("residual-final-foreign", lambda t, f, i: ["residual", str(_damaged(t, f, lambda r: _foreign_safetensors(
        r / "final" / "model.safetensors")))], "model.safetensors: does not match config.json"),
    ("residual-final-config-not-json", lambda t, f, i: ["residual", str(_damaged(
        t, f, lambda r: write(r / "final" / "config.json", "{")))], "config.json: not valid JSON"),
    ("residual-final-config-huge", lambda t, f, i: ["residual", str(_damaged(t, f, lambda r: _edit_json(
        r / "final" / "config.json", sizes=[64, 2**40, 128, 10])))], "config.json: sizes must be"),
    ("residual-final-config-bad-value", lambda t, f, i: ["residual", str(_damaged(t, f, lambda r: _edit_json(
        r / "final" / "config.json", config={"zeta": 7})))], "config.json: zeta must be in (0, 1)"),
    ("export-final-truncated", lambda t, f, i: ["export", "--onnx", str(_damaged(
        t, f, lambda r: truncate(r / "final" / "model.safetensors")))], "model.safetensors: not a readable"),
    # --- similarity: residual folders, snapshots, runs
    ("similarity-residual-truncated", lambda t, f, i: ["similarity", str(f), str(_damaged(
        t, f, lambda r: truncate(r / "final" / "residual" / "model.safetensors")) / "final" / "residual")],
     "residual/model.safetensors: not a readable"),
    ("similarity-residual-huge", lambda t, f, i: ["similarity", str(f), str(_damaged(t, f, lambda r: _edit_json(
        r / "final" / "residual" / "config.json", sizes=[2**40, 128, 128, 10])) / "final" / "residual")],
     "residual/model.safetensors: does not match config.json: kept_inputs"),
    ("similarity-residual-short-values", lambda t, f, i: ["similarity", str(f), str(_damaged(
        t, f, _short_values) / "final" / "residual")], "residual/model.safetensors: does not match"),
    ("similarity-residual-config-not-json", lambda t, f, i: ["similarity", str(f), str(_damaged(
        t, f, lambda r: write(r / "final" / "residual" / "config.json", "[1")) / "final" / "residual")],
     "residual/config.json: not valid JSON"),
    ("similarity-snapshot-truncated", lambda t, f, i: ["similarity", str(f / "topology" / "epoch-0000.safetensors"),
                                                       str(_damaged_snapshot(t, f, truncate))],
     "epoch-0001.safetensors: not a readable"),
    ("similarity-snapshot-foreign", lambda t, f, i: ["similarity", str(f / "topology" / "epoch-0000.safetensors"),
                                                     str(_damaged_snapshot(t, f, _foreign_safetensors))],
     "epoch-0001.safetensors: is not a synthprune topology snapshot"),
    ("similarity-missing", lambda t, f, i: ["similarity", str(f), str(t / "nowhere")], "nowhere: not found"),
    ("similarity-run-final-truncated", lambda t, f, i: ["similarity", str(f), str(_damaged(
        t, f, lambda r: truncate(r / "final" / "model.safetensors")))], "model.safetensors: not a readable"),
    # --- plot: metrics.csv
    ("plot-short-row", lambda t, f, i: ["plot", str(_damaged(t, f, _short_metrics_row)), "--out", str(t / "p")],
     "metrics.csv: line 3 has"),
    ("plot-header-only", lambda t, f, i: ["plot", str(_damaged(t, f, lambda r: write(
        r / "metrics.csv", (r / "metrics.csv").read_text().splitlines()[0] + "\n"))), "--out", str(t / "p")],
     "metrics.csv: has no rows"),
    ("plot-not-a-number", lambda t, f, i: ["plot", str(_damaged(t, f, lambda r: write(
        r / "metrics.csv", (r / "metrics.csv").read_text().replace("\n1,", "\nx,", 1)))), "--out", str(t / "p")],
     "metrics.csv: line 2: epoch is not a number"),
    # --- sweep files
    ("sweep-common-list", lambda t, f, i: _sweep(t, "common: [1, 2]\nruns: {a: {}}\n"),
     "spec.yaml: `common:` must be a mapping"),
    ("sweep-unknown-key", lambda t, f, i: _sweep(t, "seed: 3\nruns: {a: {}}\n"), "spec.yaml: unknown key(s) seed"),
    ("sweep-absolute-name", lambda t, f, i: _sweep(t, f"runs: {{'{t / 'victim'}': {{}}}}\n"),
     "spec.yaml: run name"),
    ("sweep-parent-name", lambda t, f, i: _sweep(t, "runs: {'../escaped': {}}\n"), "spec.yaml: run name"),
    ("sweep-run-not-mapping", lambda t, f, i: _sweep(t, "runs: {a: [1]}\n"),
     "spec.yaml: run 'a' must be a mapping"),
    ("sweep-not-yaml", lambda t, f, i: _sweep(t, "runs: {a: [\n"), "spec.yaml: not valid YAML"),
    ("sweep-zero-jobs", lambda t, f, i: [*_sweep(t, "runs: {a: {}}\n"), "--jobs", "0"], "--jobs"),
    ("sweep-zero-threads", lambda t, f, i: [*_sweep(t, "runs: {a: {}}\n"), "--threads", "0"], "--threads"),
    ("sweep-bad-seeds", lambda t, f, i: _sweep(t, "seeds: [a]\nruns: {a: {}}\n"), "spec.yaml: seeds must look like"),
    ("sweep-bad-value", lambda t, f, i: _sweep(t, "runs: {a: {epsilon: .inf}}\n"),
     "configuration 'a': epsilon must be a finite number"),
]


def _resume_after(tmp_path, interrupted, damage):
    run = copy(interrupted, tmp_path)
    damage(run)
    return ["train", "--resume", "--out", str(run), "--quiet", "--no-plots"]


def _edit_checkpoint(run, **changes):
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    state.update(changes)
    torch.save(state, run / "checkpoint.pt")


def _damaged(tmp_path, finished, damage):
    run = copy(finished, tmp_path)
    damage(run)
    return run


def _damaged_snapshot(tmp_path, finished, damage):
    path = tmp_path / "epoch-0001.safetensors"
    shutil.copy(finished / "topology" / "epoch-0001.safetensors", path)
    damage(path)
    return path


def _foreign_safetensors(path):
    from safetensors.torch import save_file

    save_file({"something": torch.zeros(4)}, str(path))


def _edit_json(path, **changes):
    values = json.loads(path.read_text())
    for key, value in changes.items():
        values[key] = {**values[key], **value} if isinstance(value, dict) else value
    path.write_text(json.dumps(values))


def _short_values(run):
    from safetensors.torch import load_file, save_file

    path = run / "final" / "residual" / "model.safetensors"
    tensors = load_file(str(path))
    tensors["layers.0.values"] = tensors["layers.0.values"][:-3].clone()
    save_file(tensors, str(path), metadata={"format": "synthprune-residual"})


def _short_metrics_row(run):
    lines = (run / "metrics.csv").read_text().splitlines()
    lines[2] = ",".join(lines[2].split(",")[:3])
    write(run / "metrics.csv", "\n".join(lines) + "\n")


def _sweep(tmp_path, text):
    return ["sweep", "--spec", str(write(tmp_path / "spec.yaml", "preset: digits-mlp\n" + text)),
            "--out", str(tmp_path / "out")]


@pytest.mark.parametrize("build, expected", [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_bad_input_exits_2_with_one_line_naming_the_flag_or_file(build, expected, tmp_path, finished, interrupted,
                                                                 capsys, monkeypatch):
    if expected == "--device" and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    monkeypatch.chdir(tmp_path)
    argv = build(tmp_path, finished, interrupted)
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert expected in err, err
    assert "Traceback" not in err
    assert not (tmp_path / "victim").exists() and not (tmp_path.parent / "escaped").exists()
