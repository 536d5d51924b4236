"""Regenerate the tables and figures of docs/RESULTS.md §6–§8 from the committed records alone:
runs each report script and puts what it prints between its markers in RESULTS.md,

    <!-- generated: NAME -->
    ...
    <!-- end: NAME -->

leaving everything outside the markers (the claims table's verdicts, the prose) as it is.

    python experiments/build_report.py [--check]      (or: make report)

``--check`` changes nothing (its figures go to a temporary folder) and exits 1 if a table in
RESULTS.md differs from what its records give now.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "RESULTS.md"
RECORDS = "experiments/results"
FIGURES = "docs/figures"
# marker name -> the report script and its arguments (paths relative to the repository;
# "{figures}" is FIGURES, or a temporary folder under --check)
SECTIONS = {
    "long-e60": ["long_report.py", f"{RECORDS}/long-e60", "{figures}/long_curves.png"],
    "long-compression-e60": ["long_report.py", f"{RECORDS}/long-compression-e60",
                             "{figures}/long_compression_curves.png"],
    "similarity-power": ["similarity_power_report.py", f"{RECORDS}/similarity-power",
                         "{figures}/similarity_power.png"],
    "tuning": ["tuning_report.py", f"{RECORDS}/tuning-e60", f"{RECORDS}/long-e60"],
    "connectivity": ["connectivity_report.py", "{figures}/input_connectivity.png"],
}
FIGURE_LINE = re.compile(r"^[\w ]+: \S+\.png$")  # "figure: docs/figures/x.png": said, not reported


def generate(name: str, figures: str = FIGURES) -> str:
    """What the section's script prints now, without its lines naming the figures it wrote."""
    script, *args = SECTIONS[name]
    args = [arg.format(figures=figures) for arg in args]
    out = subprocess.run([sys.executable, str(ROOT / "experiments" / script), *args], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    return "\n".join(line for line in out.splitlines() if not FIGURE_LINE.match(line)).strip()


def splice(text: str, name: str, content: str) -> str:
    """``text`` with the part between ``name``'s markers replaced by ``content``; a missing or
    repeated marker is an error naming it."""
    pattern = re.compile(rf"(<!-- generated: {re.escape(name)} -->\n).*?(\n<!-- end: {re.escape(name)} -->)",
                         re.DOTALL)
    found = pattern.findall(text)
    if len(found) != 1:
        raise ValueError(f"{RESULTS.name}: expected one pair of markers for {name!r}, found {len(found)}")
    return pattern.sub(lambda m: m.group(1) + content + m.group(2), text)


def main(check: bool = False) -> int:
    text = RESULTS.read_text()
    updated = text
    with tempfile.TemporaryDirectory() as scratch:
        for name in SECTIONS:
            updated = splice(updated, name, generate(name, scratch if check else FIGURES))
    if check:
        if updated != text:
            print(f"{RESULTS}: tables differ from their records; run python experiments/build_report.py")
            return 1
        return 0
    RESULTS.write_text(updated)
    print(f"regenerated {len(SECTIONS)} sections of {RESULTS.relative_to(ROOT)}: {', '.join(SECTIONS)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(check="--check" in sys.argv[1:]))
