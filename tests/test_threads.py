"""The default thread count follows the model's work: one thread for small sparse models,
every core for dense ones and convolutions; OMP_NUM_THREADS and --threads override it."""

import torch

from synthprune import SparseMLP
from synthprune.cli import main
from synthprune.models import SparseCNN
from synthprune.threads import MULTIPLY_ADDS_PER_THREAD, apply_default_threads, forward_multiply_adds, suggested_threads

REFERENCE = [784, 1000, 1000, 1000, 10]


def test_work_counts_connections_for_csr_and_the_dense_shape_otherwise():
    csr = SparseMLP(REFERENCE, epsilon=20)
    assert forward_multiply_adds(csr, 128) == (35_680 + 40_000 + 40_000 + 10_000) * 128  # dense output layer
    masked = SparseMLP(REFERENCE, epsilon=20, backend="masked")
    assert forward_multiply_adds(masked, 128) == (784_000 + 2 * 1_000_000 + 10_000) * 128
    assert forward_multiply_adds(SparseCNN((28, 28), 10, density=0.2), 128) is None


def test_suggested_threads_grow_with_the_work_between_one_and_the_cores():
    csr, dense = SparseMLP(REFERENCE, epsilon=20), SparseMLP(REFERENCE, density=1.0)
    assert suggested_threads(csr, 128, cores=16) == 1
    assert suggested_threads(dense, 128, cores=16) == round(357_632_000 / MULTIPLY_ADDS_PER_THREAD) == 7
    assert suggested_threads(dense, 128, cores=2) == 2
    assert suggested_threads(SparseCNN((28, 28), 10, density=0.2), 128, cores=6) == 6
    assert suggested_threads(SparseMLP([4, 3, 2], epsilon=1), 1, cores=8) == 1


def test_the_user_s_thread_count_wins(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        assert apply_default_threads(SparseMLP(REFERENCE, epsilon=20), 128) is None
        assert torch.get_num_threads() == before
        monkeypatch.delenv("OMP_NUM_THREADS")
        assert apply_default_threads(SparseMLP(REFERENCE, epsilon=20), 128) == 1
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_train_says_which_thread_count_it_chose(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    try:
        quick = ["train", "--preset", "digits-mlp", "--epochs", "1", "--no-plots"]
        assert main([*quick, "--out", str(tmp_path / "a")]) == 0
        assert "threads: 1 (from the model's work; --threads N to choose)" in capsys.readouterr().out
        assert main([*quick, "--threads", "2", "--out", str(tmp_path / "b")]) == 0
        assert "from the model's work" not in capsys.readouterr().out
    finally:
        torch.set_num_threads(before)
