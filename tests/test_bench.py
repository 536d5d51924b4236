"""`synthprune bench --quick` runs and reports every figure (a smoke test: timings are not tested)."""

import json

from synthprune import csr_kernel
from synthprune.cli import main


def test_bench_quick_reports_every_figure(capsys):
    assert main(["bench", "--quick", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    fast = csr_kernel.ops() is not None
    # with the fast csr kernel, the same csr model on torch.sparse is timed beside it
    contenders = {"dense", "masked", "csr"} | ({"csr_torch_sparse"} if fast else set())
    assert result["machine"]["csr_path"] == csr_kernel.describe()
    for row in result["training"].values():
        assert set(row["epoch_seconds"]) == contenders
        if fast:
            assert row["torch_sparse_over_fast"] == row["step_seconds"]["csr_torch_sparse"] / row["step_seconds"]["csr"]
        assert all(t > 0 for t in row["epoch_seconds"].values()) and row["dense_over_csr"] > 0
        # the limit line: the same step against 3 multiply-adds per connection at the GEMM rate
        limit = 3 * row["connections"]["csr"] * result["settings"]["batch"] / row["gemm_multiply_adds_per_second"]
        assert abs(row["step_limit_seconds"] - limit) < 1e-12
        assert row["csr_over_limit"] == row["step_seconds"]["csr"] / row["step_limit_seconds"]
    assert set(result["rewiring"]) == {"random", "synthesis", "gradient"}
    assert all(r["share_of_epoch"] > 0 for r in result["rewiring"].values())
    assert len(result["scaling"]) == 2 and all(r["train_step_seconds"] > 0 for r in result["scaling"].values())
    on_torch_sparse = {"csr_torch_sparse", "residual_torch_sparse"} if fast else set()
    assert set(result["inference"]["batch1_ms"]) == {"dense", "csr", "residual"} | on_torch_sparse
    assert result["memory_bytes"]["dense"] > 0 and result["memory_bytes"]["csr"] > 0
    # the tables the command prints without --json, from the same figures
    from rich.console import Console

    from synthprune.cli import bench_tables

    console = Console(record=True, width=120)
    for table in bench_tables(result):
        console.print(table)
    text = console.export_text()
    for title in ("training epoch", "against the machine's limit", "rewiring step", "csr scaling",
                  "inference latency", "peak training memory"):
        assert title in text


def test_bench_under_load_measures_each_backend_and_stops_its_load(capsys):
    import subprocess

    assert main(["bench", "--quick", "--under-load", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)["under_load"]
    for backend in ("dense", "masked", "csr"):
        row = result[backend]
        assert row["one_thread"]["threads"] == 1 and row["default"]["step_seconds"] > 0
        assert row["all_cores"]["threads"] == result["busy_processes"]
        # the default is synthprune train's: threads from the model's work (1 for these small models),
        # and it is one of the measured settings, not a third noisy measurement of the same one
        assert row["default"] == row["one_thread"]
        best = min(row[k]["step_seconds"] for k in ("one_thread", "all_cores"))
        assert row["default_over_best"] == row["default"]["step_seconds"] / best
    left = subprocess.run(["pgrep", "-f", "while True: pass"], capture_output=True, text=True).stdout.split()
    assert not left, "the busy processes were not stopped"
