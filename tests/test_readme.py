"""The README's quick start runs, and examples/quickstart.py (what `make demo` runs) is it."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_quick_start(index: int = 0) -> str:
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)[index]


def code_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip() and not line.startswith('"""')]


def test_quick_start_is_short_and_matches_the_example():
    code = readme_quick_start()
    assert len(code_lines(code)) <= 17
    assert code_lines(code) == code_lines((ROOT / "examples" / "quickstart.py").read_text())


def test_quick_start_runs_and_learns(capsys):
    exec(compile(readme_quick_start(), "README.md", "exec"), {"__name__": "__main__"})
    last = capsys.readouterr().out.strip().splitlines()[-1]
    accuracy = float(re.search(r"held-out accuracy ([0-9.]+)", last).group(1))
    assert accuracy > 0.75, last  # README: 82% on held-out examples
    assert "connections [3200, 5120]" in last


def test_compression_example_matches_and_runs(capsys, tmp_path, monkeypatch):
    code = readme_quick_start(1)
    assert code_lines(code) == code_lines((ROOT / "examples" / "compress.py").read_text())
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {"__name__": "__main__"})
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert float(re.search(r"held-out accuracy ([0-9.]+)", last).group(1)) > 0.9, last
    assert (tmp_path / "residual-net" / "model.safetensors").is_file()
