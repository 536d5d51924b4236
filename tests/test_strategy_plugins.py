"""The strategy seam: a registry that refuses silent replacement, flags and diagnostics that
belong to the strategy, options as a mapping, and a user's own strategy used from outside the
package -- through fit(), the CLI (--strategies, --grow-option) and a sweep's workers."""

import json
import runpy
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from synthprune import Rewirer, SparseMLP
from synthprune.cli import main
from synthprune.config import load_config
from synthprune.strategies import _GROW, _PRUNE, get_grow_strategy, register_grow, register_prune

ROOT = Path(__file__).resolve().parents[1]

USER_MODULE = '''
import torch
from synthprune.strategies import register_grow

@register_grow("first_inputs", diagnostics=lambda ctx, keys: {"grown_here": float(keys.numel())})
def grow_first_inputs(ctx, count, *, width: int = 4):
    """Grow only from the first `width` inputs, endpoints uniform."""
    def propose(n, generator):
        starts = torch.randint(0, min(width, ctx.n_in), (n,), generator=generator)
        return torch.randint(0, ctx.n_out, (n,), generator=generator) * ctx.n_in + starts
    return propose

@register_grow("frozen", static=True)
def grow_frozen(ctx, count):
    return lambda n, generator: torch.empty(0, dtype=torch.long)
'''


@pytest.fixture
def user_module(tmp_path):
    path = tmp_path / "my_strategies.py"
    path.write_text(textwrap.dedent(USER_MODULE))
    yield path
    for name in ("first_inputs", "frozen"):
        _GROW.pop(name, None)
    sys.modules.pop("synthprune_user_my_strategies", None)


def test_a_name_is_registered_once_unless_replaced_on_purpose():
    with pytest.raises(ValueError, match="'random' is already registered"):
        register_grow("random")(lambda ctx, count: None)
    with pytest.raises(ValueError, match="already registered"):
        register_prune("set")(lambda values: values)
    original = _GROW["random"]
    try:
        register_grow("random", replace=True)(original.fn)
        assert _GROW["random"].fn is original.fn
    finally:
        _GROW["random"] = original
    assert "set" in _PRUNE and get_grow_strategy("none").static and get_grow_strategy("gradient").needs_gradient


def test_flags_and_diagnostics_belong_to_the_strategy(user_module):
    from synthprune.strategies import import_strategies

    import_strategies(str(user_module))
    model = SparseMLP([12, 10, 3], epsilon=2, seed=0)
    before = model.fc1.keys().clone()
    reports = Rewirer(model, torch.optim.SGD(model.parameters(), lr=0.1), grow="frozen").step()
    assert torch.equal(model.fc1.keys(), before) and all(r.pruned == r.grown == 0 for r in reports)
    reports = Rewirer(model, torch.optim.SGD(model.parameters(), lr=0.1), grow="first_inputs", width=2).step()
    assert all(r.diagnostics == {"grown_here": float(r.grown)} for r in reports)
    assert "top_decile_share" not in reports[0].as_dict()  # synthesis' diagnostic is not forced on others
    with pytest.raises(ValueError, match="unknown option"):
        Rewirer(model, torch.optim.SGD(model.parameters(), lr=0.1), grow="first_inputs", depth=2)


def test_a_users_strategy_trains_through_the_cli_with_its_options(user_module, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--strategies", str(user_module), "--preset", "digits-mlp", "--grow", "first_inputs",
            "--grow-option", "width=3", "--epochs", "2", "--quiet", "--no-plots", "--out", str(out)]
    assert main(args) == 0
    config = load_config("digits-mlp", str(out / "config.yaml"))
    assert config.grow == "first_inputs" and config.grow_options == {"width": 3}
    records = [json.loads(line) for line in (out / "topology.jsonl").read_text().splitlines()]
    assert records and all(r["grown_here"] == r["grown"] for r in records)
    assert main(["train", "--strategies", str(user_module), "--preset", "digits-mlp", "--grow", "first_inputs",
                 "--grow-option", "depth=3", "--out", str(tmp_path / "bad")]) == 2
    assert "--grow-option ['depth'] are not options of grow 'first_inputs'; valid: width" in capsys.readouterr().err
    assert main(["train", "--preset", "digits-mlp", "--grow", "no_such", "--out", str(tmp_path / "bad")]) == 2
    assert "load its module with --strategies" in capsys.readouterr().err
    assert main(["list", "--strategies", str(user_module)]) == 0
    assert "first_inputs  (width=4)" in capsys.readouterr().out


def test_a_sweeps_workers_import_the_users_strategies(user_module, tmp_path):
    out = tmp_path / "sweep"
    result = subprocess.run([sys.executable, "-m", "synthprune", "sweep", "--strategies", str(user_module),
                             "--preset", "digits-mlp", "--grow", "first_inputs,random", "--epochs", "2",
                             "--jobs", "2", "--out", str(out)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (out / "first_inputs-s0" / "final" / "config.json").is_file()


def test_set_reaches_every_setting_and_names_itself_in_errors(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--preset", "digits-mlp", "--set", "hidden=[32, 16]", "--set", "momentum=0.5",
                 "--epochs", "1", "--quiet", "--no-plots", "--out", str(out)]) == 0
    config = load_config("digits-mlp", str(out / "config.yaml"))
    assert config.hidden == [32, 16] and config.momentum == 0.5
    for args, message in ((["--set", "hidden=7"], "--set hidden must be a list"),
                          (["--set", "colour=blue"], "unknown config key(s) ['colour']"),
                          (["--set", "epochs=2", "--epochs", "3"], "--set epochs and --epochs both given"),
                          (["--set", "nothing"], "--set takes KEY=VALUE")):
        assert main(["train", "--preset", "digits-mlp", *args, "--out", str(tmp_path / "bad")]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


def test_the_example_registers_a_strategy_and_trains_through_fit(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["custom_strategy.py", str(tmp_path / "run")])
    try:
        runpy.run_path(str(ROOT / "examples" / "custom_strategy.py"), run_name="__main__")
    finally:
        _GROW.pop("strong_inputs", None)
    out = capsys.readouterr().out
    accuracy = float(out.split("test accuracy ")[1].split(",")[0])
    assert accuracy > 0.8 and (tmp_path / "run" / "final" / "config.json").is_file()
