"""What the library promises and used to get silently wrong: class counts, bad saved
networks, the optimizer a Rewirer is given, epsilon vs density, init="keep", half precision,
the README's API, and output that stays whole off a terminal."""

import gzip
import re

import numpy as np
import pytest
import torch
import typer

import synthprune
from synthprune import Rewirer, SparseLinear, SparseMLP, residual_network, save_residual
from synthprune.cli import app, main
from synthprune.config import load_config
from synthprune.data import DataError, load_dataset
from synthprune.files import FileFormatError
from synthprune.runs import load_run_model
from synthprune.train import fit


def test_the_class_count_is_the_datasets_not_the_labels_left_after_limit_train(tmp_path):
    fit(load_config("digits-mlp", epochs=1, limit_train=12), tmp_path / "run", log=lambda line: None)
    model, _ = load_run_model(tmp_path / "run")
    assert model.sizes[-1] == 10


def _idx(path, magic, array):
    header = magic.to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def test_training_labels_of_one_class_are_refused(tmp_path):
    rng = np.random.default_rng(0)
    _idx(tmp_path / "train-images-idx3-ubyte.gz", 2051, rng.integers(0, 255, (60_000, 28, 28)))
    _idx(tmp_path / "train-labels-idx1-ubyte.gz", 2049, np.zeros(60_000))
    _idx(tmp_path / "t10k-images-idx3-ubyte.gz", 2051, rng.integers(0, 255, (10_000, 28, 28)))
    _idx(tmp_path / "t10k-labels-idx1-ubyte.gz", 2049, rng.integers(0, 10, 10_000))
    with pytest.raises(DataError, match="hold only class"):
        load_dataset("fashion-mnist", tmp_path)


def test_a_csr_state_dict_with_short_values_is_refused():
    layer = SparseLinear(10, 8, connections=20)
    state = layer.state_dict()
    state["values"] = state["values"][:-2].clone()
    with pytest.raises(ValueError, match="inconsistent csr tensors"):
        SparseLinear(10, 8, connections=20).load_state_dict(state)
    state = layer.state_dict()
    state["col_indices"] = state["col_indices"] + 100  # out of range
    with pytest.raises(ValueError, match="inconsistent csr tensors"):
        SparseLinear(10, 8, connections=20).load_state_dict(state)


def test_a_residual_config_with_a_huge_layer_is_refused_before_any_allocation(tmp_path):
    import json

    net, _ = residual_network(SparseMLP([8, 6, 3], epsilon=1, seed=0).eval())
    folder = save_residual(net, tmp_path / "r")
    config = json.loads((folder / "config.json").read_text())
    config["sizes"] = [config["sizes"][0], 2**40, 3]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(FileFormatError, match=r"does not match config\.json"):
        synthprune.load_residual(folder)


def test_a_rewirer_checks_its_optimizer():
    model = SparseMLP([10, 12, 4], epsilon=2, seed=0)
    other = SparseMLP([10, 12, 4], epsilon=2, seed=1)
    with pytest.raises(ValueError, match="does not hold the connection weights of fc1"):
        Rewirer(model, torch.optim.SGD(other.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="needs the optimizer that trains the model"):
        Rewirer(model)
    Rewirer(model, None)  # said explicitly: nothing trains it
    Rewirer(model, torch.optim.SGD(model.parameters(), lr=0.1))  # the right one: no complaint


def test_epsilon_and_density_together_are_refused_and_keep_is_explained():
    with pytest.raises(ValueError, match="not both"):
        SparseMLP([10, 12, 4], epsilon=5, density=0.5)
    assert SparseMLP([10, 12, 4], density=0.5).fc1.nnz == 60
    with pytest.raises(ValueError, match="sparsify"):
        SparseLinear(10, 8, connections=5, init="keep")


def test_the_masked_backend_rewires_in_half_precision():
    model = SparseMLP([10, 12, 4], epsilon=2, backend="masked", seed=0).half()
    rewirer = Rewirer(model, torch.optim.SGD(model.parameters(), lr=0.1), grow="synthesis")
    reports = rewirer.step()
    assert all(0 <= r.top_decile_share <= 1 for r in reports)


def test_the_readme_similarity_call_works():
    a, b = SparseMLP([12, 10, 3], epsilon=2, seed=0), SparseMLP([12, 10, 3], epsilon=2, seed=1)
    result = synthprune.similarity(a, b, match="hungarian")
    assert 0 <= result.matched_edge_jaccard <= 1
    assert synthprune.ResidualSummary is synthprune.residual.ResidualSummary


def _options(command) -> list[str]:
    return [name for param in command.params if param.param_type_name == "option"
            for name in (*param.opts, *param.secondary_opts)]


COMMANDS = typer.main.get_command(app).commands


@pytest.mark.parametrize("name", sorted(COMMANDS))
@pytest.mark.parametrize("columns", ["80", "60"])
def test_help_names_every_option_in_full(name, columns, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", columns)
    assert main([name, "--help"]) == 0
    out = capsys.readouterr().out
    for option in _options(COMMANDS[name]):
        assert re.search(rf"(^|[\s,/]){re.escape(option)}([\s,=]|$)", out, re.M), (option, out)
    assert "…" not in out
    assert "[onnx]" in out if name == "export" else True


def test_output_off_a_terminal_is_whole_at_any_width(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "40")
    out = tmp_path / ("a-rather-long-folder-name-" * 4) / "run"
    assert main(["train", "--preset", "digits-mlp", "--epochs", "1", "--no-plots", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed.splitlines()  # the path on one line
    assert "connections" in printed and "…" not in printed  # no cut table cell


def test_a_sparse_mlp_rebuilds_from_its_config_and_state_dict():
    import json

    model = SparseMLP([12, 10, 8, 3], epsilon=2, backend="masked", dropout=0.1, seed=4)
    clone = SparseMLP.from_config(json.loads(json.dumps(model.config())))
    clone.load_state_dict(model.state_dict())
    x = torch.randn(5, 12)
    assert torch.equal(model.eval()(x), clone.eval()(x)) and clone.fc1.backend == "masked"
