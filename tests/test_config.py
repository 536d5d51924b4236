"""TrainConfig: the one validation every configuration goes through (DESIGN §3)."""

import dataclasses

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from synthprune.config import (
    PRESETS,
    ConfigError,
    TrainConfig,
    config_from_file,
    load_config,
    parse_assignments,
)


def test_presets_resolve_and_the_reference_is_the_default():
    assert load_config() == TrainConfig().validate()
    digits = load_config("digits-mlp")
    assert digits.dataset == "digits" and digits.hidden == [128, 128]
    assert set(PRESETS) == {"fmnist-mlp", "fmnist-cnn", "digits-mlp"}


def test_values_are_typed_and_yaml_strings_of_numbers_are_numbers():
    config = TrainConfig.from_dict({"lr": "1e-3", "epochs": 3.0, "hidden": [10, 5], "compress_to": "0.05"})
    assert config.lr == 0.001 and config.epochs == 3 and isinstance(config.epochs, int)
    assert config.compress_to == 0.05


@pytest.mark.parametrize("values, key", [
    ({"epochs": 2.5}, "epochs"), ({"epochs": True}, "epochs"), ({"lr": "fast"}, "lr"), ({"hidden": 5}, "hidden"),
    ({"hidden": [1.5]}, "hidden"), ({"hidden": None}, "hidden"), ({"dense_output": "yes"}, "dense_output"),
    ({"grow": 3}, "grow"), ({"epsilon": float("inf")}, "epsilon"), ({"kappa_end": float("nan")}, "kappa_end"),
    ({"seed": -1}, "seed"), ({"seed": 2**40}, "seed"), ({"grow_options": [1]}, "grow_options"),
    ({"grow_options": {"bogus": 1}}, "grow_options"), ({"compress_start": 3}, "compress_start"),
    ({"dataset": "digits", "data_dir": "/x"}, "data_dir"), ({"device": "tpu"}, "device"),
])
def test_a_bad_value_raises_a_config_error_naming_its_key(values, key):
    with pytest.raises(ConfigError) as error:
        TrainConfig.from_dict(values)
    assert error.value.key == key and key in str(error.value)


def test_an_error_can_name_the_flag_or_file_instead():
    with pytest.raises(ConfigError) as error:
        TrainConfig.from_dict({"zeta": 2.0})
    assert str(error.value.named("--zeta")) == "--zeta must be in (0, 1), got 2.0"
    with pytest.raises(ConfigError, match=r"^run/config.yaml: zeta must be in \(0, 1\)"):
        config_from_file({"zeta": 2.0}, "run/config.yaml")
    with pytest.raises(ConfigError, match="unknown config key"):
        TrainConfig.from_dict({"zeta2": 1})


def test_synthesis_fields_and_grow_options_are_one_thing():
    config = TrainConfig.from_dict({"grow": "synthesis", "grow_options": {"endpoint": "tail", "kappa_end": 2}})
    assert config.endpoint == "tail" and config.kappa_end == 2.0 and config.grow_options == {}
    assert config.strategy_options() == {"endpoint": "tail", "kappa_start": 0.0, "kappa_end": 2.0}
    assert TrainConfig.from_dict({"grow": "random"}).strategy_options() == {}


def test_a_file_a_preset_and_overrides_stack(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"epochs": 4, "lr": 0.2}))
    config = load_config("digits-mlp", path, lr=0.3, seed=None)
    assert (config.dataset, config.epochs, config.lr, config.seed) == ("digits", 4, 0.3, 0)


def test_assignments_read_values_as_yaml():
    assert parse_assignments(["hidden=[3, 4]", "lr=1e-3", "name=cdf", "dense-output=false"], "--set") == {
        "hidden": [3, 4], "lr": "1e-3", "name": "cdf", "dense_output": False}
    with pytest.raises(ValueError, match="--set takes KEY=VALUE"):
        parse_assignments(["novalue"], "--set")


def test_compression_epochs_default_to_three_quarters_of_the_run():
    config = TrainConfig.from_dict({"epochs": 20, "compress_to": 0.01})
    assert config.compress_epochs == (1, 15)
    assert TrainConfig.from_dict({"accuracy_guard": 1.0, "compress_to": 0.1}).validation_fraction == 0.1


@given(epochs=st.integers(1, 50), lr=st.floats(1e-4, 1.0), zeta=st.floats(0.01, 0.99),
       hidden=st.lists(st.integers(1, 2000), min_size=1, max_size=4), seed=st.integers(0, 2**32 - 1),
       grow=st.sampled_from(["none", "random", "synthesis", "gradient"]))
def test_a_valid_config_survives_its_own_yaml(epochs, lr, zeta, hidden, seed, grow):
    config = TrainConfig.from_dict({"epochs": epochs, "lr": lr, "zeta": zeta, "hidden": hidden, "seed": seed,
                                    "grow": grow})
    again = TrainConfig.from_dict(yaml.safe_load(yaml.safe_dump(config.to_dict())))
    assert again == config and dataclasses.asdict(again) == config.to_dict()
