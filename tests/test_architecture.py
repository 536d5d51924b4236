"""The module layering of docs/DESIGN.md §3.1 holds, and every "DESIGN §" reference resolves."""

import ast
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "synthprune"

# docs/DESIGN.md §3.1, from the bottom up: a module imports only modules before it.
ORDER = ["allocator", "topology", "files", "optim", "data", "compression", "schedules", "strategies", "csr_kernel",
         "layers", "conv", "models", "threads", "compact", "residual", "rewiring", "checkpoint", "config", "rundir",
         "runs", "wiring", "plots", "compare", "onnx_graph", "export", "bench", "distributed", "lightning", "train",
         "experiments", "cli"]


def imports(module: str) -> set[str]:
    """The synthprune modules ``module`` imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse((PACKAGE / f"{module}.py").read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("synthprune"):
            parts = node.module.split(".")
            found |= {parts[1]} if len(parts) > 1 else {a.name for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("synthprune.")}
    return found & set(ORDER)


def test_every_module_is_placed_and_imports_only_modules_below_it():
    modules = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__", "__main__"}
    assert modules == set(ORDER), "place a new module in ORDER and in docs/DESIGN.md §3.1"
    for index, module in enumerate(ORDER):
        above = imports(module) - set(ORDER[:index]) - {module}
        assert not above, f"{module} imports {sorted(above)}, which come after it (docs/DESIGN.md §3.1)"


def test_only_the_cli_imports_the_trainer():
    assert [m for m in ORDER if "train" in imports(m)] == ["cli"]


def test_every_design_reference_points_into_the_design():
    headings = set(re.findall(r"^#+ (\d+(?:\.\d+)*)\.? ", (ROOT / "docs" / "DESIGN.md").read_text(), re.M))
    files = [*PACKAGE.glob("*.py"), ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "tests").glob("*.py")]
    cited = {(path.name, ref) for path in files for ref in re.findall(r"DESIGN §(\d+(?:\.\d+)*)", path.read_text())}
    assert cited, "the design is cited somewhere"
    missing = sorted((name, ref) for name, ref in cited if ref not in headings)
    assert not missing, f"references to no section of docs/DESIGN.md: {missing}"


def test_gitignore_ignores_no_tracked_file():
    result = subprocess.run(["git", "ls-files", "-i", "-c", "--exclude-standard"], cwd=ROOT, capture_output=True,
                            text=True)
    if result.returncode != 0:  # not a git checkout (an sdist): nothing to check
        return
    assert result.stdout.strip() == "", result.stdout
