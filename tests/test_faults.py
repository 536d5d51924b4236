"""Faults with real processes: concurrent writers, a SIGKILL between the two final writes,
directories left by a crash in the first epoch, a killed sweep, paths that try to leave --out,
file modes, and a synthesis setting that used to hang."""

import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml

from synthprune.cli import main
from synthprune.config import load_config
from synthprune.experiments import grid, plan
from synthprune.rundir import RunDir
from synthprune.runs import load_run_model
from synthprune.train import fit

pytestmark = pytest.mark.slow

TRAIN = [sys.executable, "-m", "synthprune", "train", "--preset", "digits-mlp", "--quiet", "--no-plots"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def start(args, **kwargs):
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, **kwargs)


def wait_for(condition, seconds=120.0):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_two_concurrent_trains_into_one_folder_one_wins_and_the_run_is_whole(tmp_path):
    out = tmp_path / "run"
    first = start([*TRAIN, "--epochs", "60", "--seed", "1", "--out", str(out)])
    second = start([*TRAIN, "--epochs", "60", "--seed", "2", "--out", str(out)])
    results = [(p.wait(timeout=300), p.stderr.read()) for p in (first, second)]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    assert loser.count("\n") == 1 and ("being written by another process" in loser or "already holds a run" in loser)
    seed = yaml.safe_load((out / "config.yaml").read_text())["seed"]
    assert torch.load(out / "checkpoint.pt", weights_only=True)["config"]["seed"] == seed
    _, config = load_run_model(out)
    assert config.seed == seed


def test_resume_while_the_run_is_training_is_refused(tmp_path):
    out = tmp_path / "run"
    trainer = start([*TRAIN, "--epochs", "400", "--out", str(out)])
    try:
        wait_for(lambda: (out / "checkpoint.pt").exists())
        code = main(["train", "--resume", "--out", str(out), "--quiet", "--no-plots"])
        assert code == 2
        assert RunDir(out).lock.holder() == str(trainer.pid)
    finally:
        trainer.send_signal(signal.SIGINT)
        trainer.wait(timeout=60)
    assert trainer.returncode == 130 and not RunDir(out).is_finished()
    assert main(["train", "--resume", "--out", str(out), "--quiet", "--no-plots"]) == 0  # now it may


KILL_BETWEEN_FINAL_WRITES = """
import os, signal, sys
import synthprune.runs as runs
real = runs.atomic_write
def atomic_write(path, data):
    if path.name == "config.json" and path.parent.name == "final":
        os.kill(os.getpid(), signal.SIGKILL)  # after final/model.safetensors, before final/config.json
    real(path, data)
runs.atomic_write = atomic_write
from synthprune.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_kill_between_the_two_final_writes_leaves_a_run_resume_completes(tmp_path):
    out = tmp_path / "run"
    process = subprocess.run([sys.executable, "-c", KILL_BETWEEN_FINAL_WRITES, "train", "--preset", "digits-mlp",
                              "--epochs", "3", "--quiet", "--no-plots", "--out", str(out)], env=ENV)
    assert process.returncode == -signal.SIGKILL
    run = RunDir(out)
    assert (run.final / "model.safetensors").exists() and not run.is_finished()
    assert main(["residual", str(out)]) == 2  # not finished: one clear line, not a half-read run
    assert main(["train", "--resume", "--out", str(out), "--quiet", "--no-plots"]) == 0
    assert run.is_finished()
    assert main(["residual", str(out)]) == 0 and main(["plot", str(out)]) == 0
    whole = tmp_path / "whole"  # the same run, uninterrupted, with the same thread count
    assert subprocess.run([*TRAIN, "--epochs", "3", "--out", str(whole)], env=ENV).returncode == 0
    from safetensors.torch import load_file

    resumed, uninterrupted = (load_file(str(r / "final" / "model.safetensors")) for r in (out, whole))
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)  # bit for bit


def test_a_nan_in_the_first_epoch_leaves_a_folder_the_next_start_reuses(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--preset", "digits-mlp", "--lr", "1e12", "--quiet", "--no-plots", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "no epoch finished" in err and "checkpoint.pt" not in err  # names no checkpoint that does not exist
    assert RunDir(out).is_unstarted()
    assert main(["train", "--preset", "digits-mlp", "--epochs", "2", "--no-plots", "--out", str(out)]) == 0
    assert "had not finished an epoch" in capsys.readouterr().out
    assert yaml.safe_load((out / "config.yaml").read_text())["lr"] == 0.05 and RunDir(out).is_finished()


def test_an_interrupt_in_the_first_epoch_leaves_a_folder_resume_restarts(tmp_path, capsys):
    out = tmp_path / "run"
    # Rewiring every 3 steps makes the first epoch last seconds: without it the faster step
    # finished the epoch (0.3 s) before the interrupt came.
    trainer = start([*TRAIN, "--epochs", "3", "--limit-train", "1000", "--batch-size", "1", "--rewire-every", "3",
                     "--out", str(out)])
    wait_for(lambda: (out / "config.yaml").exists())
    time.sleep(0.5)
    trainer.send_signal(signal.SIGINT)
    assert trainer.wait(timeout=60) == 130
    assert RunDir(out).is_unstarted()
    assert main(["train", "--resume", "--out", str(out), "--no-plots"]) == 0
    assert "starting it again from epoch 1 with its config.yaml" in capsys.readouterr().out
    assert len(RunDir(out).read_metrics()) == 3


def test_a_killed_sweep_stops_its_workers_and_a_rerun_resumes(tmp_path):
    out = tmp_path / "sweep"
    sweep = start([sys.executable, "-m", "synthprune", "sweep", "--preset", "digits-mlp", "--grow", "random",
                   "--epochs", "400", "--jobs", "1", "--out", str(out)])
    run = RunDir(out / "random-s0")
    wait_for(lambda: run.checkpoint.exists())
    worker = int(run.lock.holder())
    assert worker != sweep.pid and alive(worker)
    sweep.kill()  # SIGKILL to the sweep alone: its worker must not train on as an orphan
    sweep.wait()
    wait_for(lambda: not alive(worker), seconds=20)
    epochs = len(run.read_metrics())
    (again,) = plan({"random": {"grow": "random", "epochs": 400}}, [0], out, "digits-mlp")
    assert again.out == run.root and epochs < 400


def test_a_sweep_started_in_the_background_still_interrupts_its_workers(tmp_path):
    # A shell starts background jobs with SIGINT ignored, and a Python child inherits that: the
    # sweep's SIGINT to its workers did nothing, so stopping the sweep waited 30 s and then
    # SIGKILLed them mid-epoch. Workers now get SIGINT back and checkpoint at once.
    out = tmp_path / "sweep"
    sweep = start([sys.executable, "-m", "synthprune", "sweep", "--preset", "digits-mlp", "--grow", "random",
                   "--epochs", "20000", "--jobs", "1", "--out", str(out)],
                  preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    run = RunDir(out / "random-s0")
    wait_for(lambda: run.checkpoint.exists())
    worker = int(run.lock.holder())
    sweep.send_signal(signal.SIGTERM)
    stopped = time.monotonic()
    wait_for(lambda: not alive(worker), seconds=60)
    assert time.monotonic() - stopped < 15  # the kill fallback comes after 30 s
    assert sweep.wait(timeout=60) == 130


def test_two_sweeps_into_one_folder_are_refused(tmp_path, capsys):
    out = tmp_path / "sweep"
    first = start([sys.executable, "-m", "synthprune", "sweep", "--preset", "digits-mlp", "--grow", "random",
                   "--epochs", "400", "--jobs", "1", "--out", str(out)])
    try:
        wait_for(lambda: (out / "random-s0" / "checkpoint.pt").exists())
        assert main(["sweep", "--preset", "digits-mlp", "--grow", "random", "--epochs", "400", "--out", str(out)]) == 2
        assert "sweep folder is being written by another process" in capsys.readouterr().err
    finally:
        first.send_signal(signal.SIGTERM)  # stops as Ctrl-C does: the worker is interrupted too
        first.wait(timeout=60)
    wait_for(lambda: not RunDir(out / "random-s0").lock.is_held_elsewhere(), seconds=30)


def test_sweep_names_never_leave_out(tmp_path, capsys):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "victim-s0.yaml").write_text("precious")
    out = tmp_path / "out"
    for name in (str(victim), "../escaped", ".hidden", "a/b"):
        spec = tmp_path / "spec.yaml"
        spec.write_text(yaml.safe_dump({"preset": "digits-mlp", "common": {"epochs": 1}, "runs": {name: {}}}))
        assert main(["sweep", "--spec", str(spec), "--out", str(out)]) == 2
        assert "run name" in capsys.readouterr().err
    assert (victim / "victim-s0.yaml").read_text() == "precious" and not (tmp_path / "escaped-s0").exists()
    # Grid names from --set values are made safe, and land inside --out.
    configs = grid(["random"], [], ["data_dir=x/../../../../setesc"])
    (name,) = configs
    assert "/" not in name and not name.startswith(".")
    (run,) = plan({name: {"grow": "random"}}, [0], out, "digits-mlp")
    assert run.out.resolve().parent == out.resolve()
    # A run folder that is a symbolic link out of --out is refused.
    out.mkdir(exist_ok=True)
    (out / "linked-s0").symlink_to(victim)
    with pytest.raises(ValueError, match="resolves outside --out"):
        plan({"linked": {}}, [0], out, "digits-mlp")


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_files_follow_the_umask_and_killed_writes_are_cleaned(tmp_path, umask):
    previous = os.umask(umask)
    try:
        out = tmp_path / "run"
        fit(load_config("digits-mlp", epochs=1), out, log=lambda line: None)
        assert main(["residual", str(out)]) == 0
    finally:
        os.umask(previous)
    expected = 0o666 & ~umask
    for path in ("config.yaml", "metrics.csv", "checkpoint.pt", "final/model.safetensors", "final/config.json",
                 "final/residual/model.safetensors"):
        assert stat.S_IMODE((out / path).stat().st_mode) == expected, path
    # A temporary file left by a write that was killed is removed by the next writer of the run.
    leftover = out / ".checkpoint.pt.a1b2c3d4.tmp"
    leftover.write_bytes(b"partial")
    (out / "final" / "config.json").unlink()
    assert main(["train", "--resume", "--out", str(out), "--quiet", "--no-plots"]) == 0
    assert not leftover.exists()


SYNTHESIS_TAIL = """
import torch, synthprune
from synthprune.strategies import GrowContext, grow_synthesis
torch.manual_seed(0)
values = torch.randn(50)
keys = torch.randperm(400)[:50].sort().values
ctx = GrowContext(n_in=20, n_out=20, keys=keys, values=values)
for kappa in (1e12, 1e300, -1e12):
    grow_synthesis(ctx, 30, endpoint="tail", kappa_end=kappa)(30, torch.Generator().manual_seed(0))
for bad in (float("inf"), float("nan")):
    try:
        grow_synthesis(ctx, 30, endpoint="tail", kappa_end=bad)
    except ValueError as exc:
        assert "finite" in str(exc)
    else:
        raise AssertionError("accepted")
print("done")
"""


def test_extreme_kappa_finishes_and_infinite_kappa_is_refused():
    source = textwrap.dedent(SYNTHESIS_TAIL)
    result = subprocess.run([sys.executable, "-c", source], capture_output=True, text=True, timeout=120, env=ENV)
    assert result.returncode == 0 and "done" in result.stdout, result.stderr
