"""tune.space parsing and validation, and Optuna suggestions from it."""
import optuna
import pytest

from pipelines.config import ConfigError, load_config
from pipelines.tune.space import Param, as_overlay, parse_space, suggest


def space_cfg(space):
    import json

    return load_config([], [f"tune.space={json.dumps(space)}"])


def test_a_space_of_each_kind_parses_and_suggests_inside_its_bounds():
    cfg = space_cfg({"train.optimizer": {"choice": ["adam", "sgd"]},
                     "train.learning_rate": {"float": [1e-4, 1e-1], "log": True},
                     "train.batch_size": {"int": [32, 256]}})
    params = parse_space(cfg)
    assert params[0] == Param("train.optimizer", "choice", choices=("adam", "sgd"))
    assert params[1].log and params[2].kind == "int"
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=1))
    for _ in range(5):
        values = suggest(study.ask(), params)
        assert values["train.optimizer"] in ("adam", "sgd")
        assert 1e-4 <= values["train.learning_rate"] <= 1e-1
        assert isinstance(values["train.batch_size"], int) and 32 <= values["train.batch_size"] <= 256
    assert as_overlay({"train.optimizer": "sgd", "train.dropout": 0.1}) == {"train": {"optimizer": "sgd", "dropout": 0.1}}


@pytest.mark.parametrize("space, message", [
    ({}, "tune.space is empty"),
    ({"train.optimzer": {"choice": ["adam"]}}, "unknown key 'train.optimzer'"),
    ({"ingest.name": {"choice": ["a"]}}, "only train.* keys"),
    ({"train.epochs": {"int": [1, 3]}}, "set by the study"),
    ({"train.optimizer": {"choice": ["adam", "lion"]}}, "'train.optimizer' must be one of"),
    ({"train.learning_rate": {"float": [0.1, 0.01]}}, "low 0.1 must be below high 0.01"),
    ({"train.learning_rate": {"float": [0, 0.1], "log": True}}, "a log range needs low > 0"),
    ({"train.dropout": {"float": [0.0, 1.5]}}, "'train.dropout' must be in [0, 1)"),
    ({"train.batch_size": {"int": [16.5, 64]}}, "must be [low, high] (int values)"),
    ({"train.batch_size": {"range": [16, 64]}}, "unknown distribution 'range'"),
    ({"train.batch_size": [16, 64]}, "expected {choice: [...]}"),
])
def test_a_bad_space_is_a_config_error_naming_the_key(space, message):
    with pytest.raises(ConfigError, match=None) as err:
        parse_space(space_cfg(space))
    assert message in str(err.value)
