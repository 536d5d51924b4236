"""Sweeps: grids, failing runs that do not stop the others, resumption, skipping."""

import csv

import pytest

import synthprune.train
from synthprune.cli import main
from synthprune.experiments import grid, parse_seeds, plan, run_sweep
from synthprune.rundir import RunDir
from synthprune.train import fit


def test_seeds_and_grid():
    assert parse_seeds("0-2,5") == [0, 1, 2, 5]
    with pytest.raises(ValueError, match="seeds"):
        parse_seeds("a-b")
    configs = grid(["random", "dense"], ["full", "0.01"], ["endpoint=cdf,tail"])
    assert set(configs) == {"random-endpoint=cdf", "random-endpoint=tail", "random-c0.01-endpoint=cdf",
                            "random-c0.01-endpoint=tail", "dense-endpoint=cdf", "dense-endpoint=tail"}
    assert configs["random-c0.01-endpoint=tail"] == {"grow": "random", "compress_to": "0.01", "endpoint": "tail"}
    assert configs["dense-endpoint=cdf"]["backend"] == "dense"
    with pytest.raises(ValueError, match="KEY=V1,V2"):
        grid(["random"], [], ["endpoint"])


def test_bad_configuration_fails_before_anything_runs(tmp_path):
    with pytest.raises(ValueError, match="configuration 'x': zeta must be in"):
        plan({"x": {"zeta": 3.0}}, [0], tmp_path, "digits-mlp")
    assert not any(tmp_path.iterdir())


def read(path):
    with path.open() as handle:
        return list(csv.DictReader(handle))


def test_a_failing_run_is_reported_and_does_not_stop_the_others(tmp_path, capsys):
    spec = tmp_path / "sweep.yaml"
    spec.write_text("preset: digits-mlp\nseeds: [0]\ncommon: {epochs: 2}\n"
                    "runs:\n  ok: {grow: random}\n  exploding: {lr: 1.0e12}\n  also-ok: {grow: synthesis}\n")
    out = tmp_path / "sweep"
    assert main(["sweep", "--spec", str(spec), "--out", str(out), "--jobs", "2"]) == 1
    rows = {row["config"]: row for row in read(out / "sweep.csv")}
    assert rows["ok"]["status"] == rows["also-ok"]["status"] == "finished"
    assert rows["exploding"]["status"] == "failed" and "loss became" in rows["exploding"]["error"]
    summary = (out / "summary.md").read_text()
    assert "| ok | 1 |" in summary and "Failed runs:" in summary
    assert "1 run(s) failed" in capsys.readouterr().out


def test_rerun_resumes_interrupted_runs_and_skips_finished_ones(tmp_path, monkeypatch):
    out = tmp_path / "sweep"
    runs = plan({"synthesis": {"epochs": 3}}, [0, 1, 2], out, "digits-mlp")
    # seed 0: interrupted after epoch 1 (a killed worker leaves its checkpoint);
    # seed 1: killed before its first checkpoint (config.yaml only); seed 2: finished earlier.
    real, calls = synthprune.train.evaluate, []

    def evaluate(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(synthprune.train, "evaluate", evaluate)
    with pytest.raises(KeyboardInterrupt):
        fit(runs[0].config, runs[0].out, log=lambda line: None)
    monkeypatch.undo()
    unstarted = RunDir(runs[1].out)
    unstarted.prepare(runs[1].config.to_dict(), resume=False)
    unstarted.release()
    fit(runs[2].config, runs[2].out, log=lambda line: None)

    actions = {}
    results = run_sweep(runs, out, jobs=2, on_done=lambda r, action: actions.__setitem__(r.run.seed, action))
    assert actions == {0: "resume", 1: "start", 2: "skip"}
    assert [r.status for r in results] == ["finished", "finished", "skipped"]
    for run in runs:
        assert len(read(run.out / "metrics.csv")) == 3

    uninterrupted = tmp_path / "whole"
    fit(runs[0].config, uninterrupted, log=lambda line: None)
    # The worker ran with other thread counts than this process: equal up to float rounding.
    numbers = lambda rows: [{k: float(v) for k, v in row.items() if "seconds" not in k} for row in rows]
    resumed, whole = numbers(read(runs[0].out / "metrics.csv")), numbers(read(uninterrupted / "metrics.csv"))
    assert [row.keys() for row in resumed] == [row.keys() for row in whole]
    for a, b in zip(resumed, whole, strict=True):
        assert a == pytest.approx(b, rel=1e-5)


def test_an_existing_run_with_other_settings_is_not_overwritten(tmp_path):
    out = tmp_path / "sweep"
    (run,) = plan({"a": {"epochs": 1}}, [0], out, "digits-mlp")
    fit(run.config, run.out, log=lambda line: None)
    (changed,) = plan({"a": {"epochs": 2}}, [0], out, "digits-mlp")
    with pytest.raises(ValueError, match="holds a run with other settings"):
        run_sweep([changed], out)


def test_a_sweep_killed_mid_run_resumes_from_the_checkpoint(tmp_path):
    # A real kill: SIGKILL the sweep and its workers once a run has checkpointed an epoch.
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "sweep"
    args = [sys.executable, "-m", "synthprune", "sweep", "--preset", "digits-mlp", "--grow", "random",
            "--seeds", "0", "--epochs", "60", "--jobs", "1", "--out", str(out)]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    checkpoint = out / "random-s0" / "checkpoint.pt"
    deadline = time.monotonic() + 120
    while not checkpoint.exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert checkpoint.exists() and not (out / "random-s0" / "final").exists(), "the run finished before the kill"
    epochs_done = len(read(out / "random-s0" / "metrics.csv"))

    (run,) = plan({"random": {"grow": "random", "epochs": 60}}, [0], out, "digits-mlp")
    actions = {}
    (result,) = run_sweep([run], out, on_done=lambda r, action: actions.__setitem__("random", action))
    assert actions == {"random": "resume"} and result.status == "finished"
    assert len(read(out / "random-s0" / "metrics.csv")) == 60 > epochs_done


def test_a_run_from_before_a_new_setting_existed_is_still_recognised(tmp_path):
    # Regression: a finished run whose config.yaml predates `save_topology_every` was refused
    # as "other settings" although the new setting's default is what it ran with.
    import yaml

    out = tmp_path / "sweep"
    (run,) = plan({"a": {"epochs": 1}}, [0], out, "digits-mlp")
    fit(run.config, run.out, log=lambda line: None)
    saved = yaml.safe_load((run.out / "config.yaml").read_text())
    del saved["save_topology_every"]
    (run.out / "config.yaml").write_text(yaml.safe_dump(saved))
    (result,) = run_sweep([run], out)
    assert result.status == "skipped"


def test_sweep_csv_accumulates_across_invocations(tmp_path):
    out = tmp_path / "sweep"
    configs = {"none": {"grow": "none", "epochs": 1}}
    run_sweep(plan(configs, [0], out, "digits-mlp"), out, jobs=1)
    run_sweep(plan(configs, [1], out, "digits-mlp"), out, jobs=1)  # another seed, later
    rows = read(out / "sweep.csv")
    assert [(r["config"], r["seed"]) for r in rows] == [("none", "1"), ("none", "0")]  # this one's, then earlier
    assert [r["status"] for r in rows] == ["finished", "skipped"]
    assert "| none | 2 |" in (out / "summary.md").read_text()  # both seeds in the mean
    (out / "none-s0" / "final" / "config.json").write_text("{")  # a damaged earlier run: listed, not fatal
    run_sweep(plan(configs, [1], out, "digits-mlp"), out, jobs=1)
    rows = read(out / "sweep.csv")
    assert rows[1]["status"] == "failed" and "config.json" in rows[1]["error"]


def test_a_run_whose_summary_fails_is_reported_and_the_sweep_goes_on(tmp_path, monkeypatch):
    # As when a sweep's own code cannot read what a newer worker wrote: one failure, not a crash.
    import synthprune.experiments as experiments

    real = experiments._summary

    def summary(run):
        if run.seed == 0:
            raise ValueError("final/config.json: unknown config key(s) ['newer']")
        return real(run)

    monkeypatch.setattr(experiments, "_summary", summary)
    out = tmp_path / "sweep"
    results = run_sweep(plan({"none": {"grow": "none", "epochs": 1}}, [0, 1], out, "digits-mlp"), out, jobs=1)
    assert [r.status for r in results] == ["failed", "finished"]
    assert "summary failed" in results[0].error and "unknown config key" in results[0].error
    assert [row["status"] for row in read(out / "sweep.csv")] == ["failed", "finished"]
