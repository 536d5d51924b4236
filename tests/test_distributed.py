"""Data-parallel training (torchrun, gloo, 2 processes on this machine): the replicas hold the
same wiring, values and optimizer state after every rewiring step; a 2-process run matches a
1-process run with the same global batch; an interrupted 2-process run resumes exactly."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file

from synthprune import distributed
from synthprune.cli import command_line, main
from synthprune.models import SparseMLP
from synthprune.strategies import list_strategies

TESTS = Path(__file__).parent
WORKER_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
# The shared run: synthesis with compression, so the wrapper is rebuilt around shrinking layers.
RUN_ARGS = ["--preset", "digits-mlp", "--grow", "synthesis", "--compress-to", "0.05", "--epochs", "8",
            "--no-plots", "--quiet"]


def torchrun(*args, nproc=2, **kwargs):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    return subprocess.run(command, env=WORKER_ENV, capture_output=True, text=True, timeout=300, **kwargs)


def synthprune(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "synthprune", *args], env=WORKER_ENV, capture_output=True,
                          text=True, timeout=300, **kwargs)


def rows(run):
    with open(Path(run) / "metrics.csv") as handle:
        return list(csv.DictReader(handle))


@given(n=st.integers(0, 300), world=st.integers(1, 8))
def test_shards_cover_a_batch_once_and_differ_by_at_most_one(n, world):
    batch = torch.randperm(n)
    shards = [distributed.shard(batch, distributed.Ranks(rank, world)) for rank in range(world)]
    assert torch.equal(torch.cat(shards), batch)
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1


def test_digests_see_wiring_values_and_optimizer_state():
    model = SparseMLP([10, 12, 3], epsilon=2.0, seed=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 10)).sum().backward()
    optimizer.step()
    before = distributed.synchronized_digests(model, optimizer)
    assert set(before) == {"fc1.wiring", "fc1.values", "fc1.optimizer", "fc2.values", "fc2.optimizer"}
    layer = model.fc1
    keys, values = layer.keys().clone(), layer.connection_values().detach().clone()
    keys[0] = next(k for k in range(10 * 12) if k not in set(keys.tolist()))
    changes = {
        "fc1.values": lambda: layer.connection_values().detach().__setitem__(0, 1.0),
        "fc1.optimizer": lambda: optimizer.state[layer.connection_parameter()]["momentum_buffer"].add_(1e-7),
        "fc1.wiring": lambda: layer.set_connections(keys.sort().values, values),
    }
    for name, change in changes.items():
        change()
        after = distributed.synchronized_digests(model, optimizer)
        assert after[name] != before[name], name
        before = after


def test_options_turn_back_into_a_command_line():
    options = {"preset": "digits-mlp", "config": None, "epochs": 3, "out": Path("runs/x"), "resume": True,
               "quiet": False, "plots": False}
    assert command_line(options) == ["--preset", "digits-mlp", "--epochs", "3", "--out", "runs/x", "--resume",
                                     "--no-plots"]
    assert command_line({"plots": True}) == []


def test_nproc_is_refused_inside_torchrun(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["train", "--preset", "digits-mlp", "--nproc", "2", "--out", "unused"]) == 2
    assert "under torchrun leave it out" in capsys.readouterr().err


@pytest.mark.slow  # several real processes: runs in CI, skip locally with -m 'not slow'
def test_replicas_hold_the_same_model_after_every_rewiring_step(tmp_path):
    result = torchrun(str(TESTS / "ddp_worker.py"), str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = (json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1))
    assert rank0["world_size"] == 2
    expected = {f"{b}/{g}/{c}" for b in ("csr", "masked") for g in list_strategies()["grow"]
                for c in ("fixed", "compress")}
    assert set(rank0["scenarios"]) == expected
    assert rank0["scenarios"] == rank1["scenarios"]  # every digest after every step
    for name, steps in rank0["scenarios"].items():
        wirings = [step["fc1.wiring"] for step in steps]
        if "/none/" not in name or "compress" in name:  # the wiring really changed each step
            assert len(set(wirings)) == len(wirings), name
    for record in (rank0, rank1):  # a perturbation on one rank is caught, naming the layer
        assert "ranks disagree after the perturbation on fc2.values" in record["perturbed"]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "two"
    result = synthprune("train", *RUN_ARGS, "--nproc", "2", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.mark.slow  # several real processes: runs in CI, skip locally with -m 'not slow'
def test_two_processes_match_one_with_the_same_global_batch(two_process_run, tmp_path):
    # digits-mlp has no dropout, so the only difference is the order of float sums in the
    # gradient all-reduce: per-epoch loss within 1e-5 (relative), accuracies within 1 point.
    one = tmp_path / "one"
    assert main(["train", *RUN_ARGS, "--out", str(one)]) == 0
    single, double = rows(one), rows(two_process_run)
    assert len(single) == len(double) == 8
    for a, b in zip(single, double, strict=True):
        assert float(b["train_loss"]) == pytest.approx(float(a["train_loss"]), rel=1e-5)
        assert abs(float(b["test_accuracy"]) - float(a["test_accuracy"])) <= 0.01
        assert b["connections"] == a["connections"]  # the same compression schedule


@pytest.mark.slow  # several real processes: runs in CI, skip locally with -m 'not slow'
def test_an_interrupted_two_process_run_resumes_exactly(two_process_run, tmp_path):
    # With the accuracy guard: validation is sharded too, and every rank must pause alike.
    guarded = [*RUN_ARGS, "--epochs", "12", "--accuracy-guard", "0.5", "--nproc", "2"]
    out = tmp_path / "interrupted"
    args = [sys.executable, "-m", "synthprune", "train", *guarded, "--out", str(out)]
    process = subprocess.Popen(args, env=WORKER_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None and (
            not (out / "metrics.csv").exists() or len(rows(out)) < 2):
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)  # Ctrl-C
    assert process.wait(timeout=60) == 130
    assert "continue with: synthprune train --resume" in process.stderr.read()
    done = len(rows(out))
    assert 2 <= done < 12, "the run finished before the interruption"

    resumed = synthprune("train", "--resume", "--out", str(out), "--nproc", "2", "--quiet", "--no-plots")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    whole = tmp_path / "whole"
    assert synthprune("train", *guarded, "--out", str(whole)).returncode == 0
    # Same processes, same shards, same all-reduce order: bit for bit.
    resumed_model, whole_model = (load_file(run / "final" / "model.safetensors") for run in (out, whole))
    assert resumed_model.keys() == whole_model.keys()
    assert all(torch.equal(resumed_model[k], whole_model[k]) for k in whole_model)
    strip = lambda table: [{k: v for k, v in row.items() if "seconds" not in k} for row in table]
    assert strip(rows(out)) == strip(rows(whole))
    assert "validation_accuracy" in rows(whole)[0] and "compression_paused" in rows(whole)[0]


@pytest.mark.slow  # several real processes: runs in CI, skip locally with -m 'not slow'
def test_a_refused_run_prints_one_error_not_one_per_process(two_process_run):
    result = synthprune("train", *RUN_ARGS, "--nproc", "2", "--out", str(two_process_run))
    assert result.returncode == 2
    assert result.stderr.count("error:") == 1 and "already holds a run" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow  # several real processes: runs in CI, skip locally with -m 'not slow'
def test_a_nan_loss_on_any_rank_stops_every_rank_with_one_error(tmp_path):
    result = synthprune("train", *RUN_ARGS, "--lr", "1e6", "--nproc", "2", "--out", str(tmp_path / "nan"))
    assert result.returncode == 1, result.stderr[-3000:]
    assert result.stderr.count("error:") == 1 and "loss became non-finite" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow  # several real processes: runs in CI, skip locally with -m 'not slow'
def test_a_last_batch_of_one_leaves_a_rank_an_empty_shard_and_still_matches_one_process(tmp_path):
    # 321 = 10 batches of 32 + 1: in the last batch rank 1 has no example at all. Its loss must
    # not read as NaN (the mean of nothing), and its zero gradient still joins the all-reduce.
    args = ["--preset", "digits-mlp", "--limit-train", "321", "--epochs", "2", "--quiet", "--no-plots"]
    two = synthprune("train", *args, "--nproc", "2", "--out", str(tmp_path / "two"))
    assert two.returncode == 0, two.stderr[-3000:]
    assert main(["train", *args, "--out", str(tmp_path / "one")]) == 0
    for a, b in zip(rows(tmp_path / "one"), rows(tmp_path / "two"), strict=True):
        assert float(b["train_loss"]) == pytest.approx(float(a["train_loss"]), rel=1e-5)
        assert b["test_accuracy"] == a["test_accuracy"]
