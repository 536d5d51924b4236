"""The README's quick start runs, and examples/quickstart.py (what `make demo` runs) is it."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_quick_start() -> str:
    return re.search(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)


def code_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip() and not line.startswith('"""')]


def test_quick_start_is_short_and_matches_the_example():
    code = readme_quick_start()
    assert len(code_lines(code)) <= 17
    assert code_lines(code) == code_lines((ROOT / "examples" / "quickstart.py").read_text())


def test_quick_start_runs_and_learns(capsys):
    exec(compile(readme_quick_start(), "README.md", "exec"), {"__name__": "__main__"})
    last = capsys.readouterr().out.strip().splitlines()[-1]
    accuracy = float(re.search(r"accuracy ([0-9.]+)", last).group(1))
    assert accuracy > 0.9, last
    assert "connections [3200, 5120]" in last
