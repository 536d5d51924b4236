"""The examples under examples/ that the README points to run as a user would run them, and
print what the README says they print."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_example(name: str, tmp_path: Path) -> str:
    done = subprocess.run([sys.executable, str(EXAMPLES / name)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600, env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip().splitlines()[-1]


def test_your_cnn(tmp_path):
    last = run_example("your_cnn.py", tmp_path)
    assert float(re.search(r"test accuracy ([0-9.]+)", last).group(1)) > 0.85, last
    assert "rewiring steps 19" in last and "same outputs: True" in last
    assert (tmp_path / "cnn-checkpoint.pt").is_file()


@pytest.mark.slow
def test_lightning_example(tmp_path):
    pytest.importorskip("lightning")
    last = run_example("lightning_digits.py", tmp_path)
    assert float(re.search(r"validation accuracy ([0-9.]+)", last).group(1)) > 0.9, last
    assert "15 rewiring steps; sparse connections 4096 (of 81920 dense)" in last


@pytest.mark.slow
def test_ddp_example(tmp_path):
    last = run_example("ddp.py", tmp_path)
    assert last.startswith("2 processes: held-out accuracy") and "after 12 rewiring steps" in last
    assert float(re.search(r"accuracy ([0-9.]+)", last).group(1)) > 0.8, last


def test_deploy_onnx_example(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    last = run_example("deploy_onnx.py", tmp_path)
    assert last.startswith("onnxruntime matches PyTorch: True"), last
    assert int(re.search(r"sparse file (\d+)x smaller", last).group(1)) >= 5, last
    forms = ("auto", "sparse", "densify", "dense")
    assert {p.name for p in tmp_path.glob("*.onnx")} == {f"model-{form}.onnx" for form in forms}
