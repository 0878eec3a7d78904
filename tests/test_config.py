import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parent.parent


def test_base_config_loads_with_every_section():
    cfg = load_config()
    assert cfg.train.model == "vgg_small" and cfg.train.epochs == 8
    assert cfg.ingest.source.type == "idx"
    assert set(cfg.to_dict()) == {"paths", "spark", "mlflow", "ingest", "train", "evaluate", "infer", "tune", "workflow", "cluster"}


def test_overlays_then_overrides_win_in_order(tmp_path):
    overlay = tmp_path / "o.yaml"
    overlay.write_text("train:\n  epochs: 7\n  batch_size: 64\n")
    cfg = load_config([ROOT / "conf/local.yaml", overlay], ["train.epochs=3", "train.augment=true"])
    assert cfg.train.epochs == 3          # --set beats the overlay
    assert cfg.train.batch_size == 64     # the overlay beats base
    assert cfg.train.augment is True
    assert cfg.sources[-1] == str(overlay)


def test_every_shipped_overlay_is_valid():
    for name in ("local", "cluster", "databricks"):
        load_config([ROOT / f"conf/{name}.yaml"])
    for profile in (ROOT / "conf/profiles").glob("*.yaml"):
        load_config([ROOT / "conf/local.yaml", profile])


@pytest.mark.parametrize("overrides, message", [
    (["train.epochz=3"], "--set: unknown key 'train.epochz'"),
    (["train.epochs=three"], "--set: 'train.epochs' must be an integer, got 'three'"),
    (["train.optimizer=adamw"], "'train.optimizer' must be one of sgd"),
    (["train.scale_lr=1"], "'train.scale_lr' must be true or false"),
    (["ingest.split.validation=0.6", "ingest.split.test=0.5"], "validation + test < 1"),
    (["nosuchsection.x=1"], "unknown key 'nosuchsection'"),
    (["train.cache_mb=-1"], "'train.cache_mb' must be at least 0"),
    (["train.timeout_s=0"], "'train.timeout_s' must be at least 1"),
    (["train.horovod_cycle_time_ms=0"], "'train.horovod_cycle_time_ms' must be greater than 0, or null"),
    (["train.elastic_min_workers=3"], "'train.elastic_min_workers' must be in 1..train.num_proc"),
    (["train.elastic_commit_steps=0"], "'train.elastic_commit_steps' must be at least 1"),
    (["ingest.image.channels=true"], "'ingest.image.channels' must be one of 1, 3"),
])
def test_bad_values_name_the_key_and_the_source(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config([], overrides)
    assert message in str(err.value)


@pytest.mark.fault('a config with an unknown key', kind='bad_input',
                   shows='config error naming the file and key, exit 2')
def test_unknown_key_in_a_file_names_that_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("spark:\n  mastr: local[1]\n")
    with pytest.raises(ConfigError, match=rf"{bad}: unknown key 'spark.mastr'"):
        load_config([bad])


@pytest.mark.fault('a config value of the wrong type', kind='bad_input',
                   shows='config error naming the file and key, exit 2')
def test_wrong_type_in_a_file_names_that_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  num_proc: [2]\n")
    with pytest.raises(ConfigError, match=rf"{bad}: 'train.num_proc' must be an integer"):
        load_config([bad])


def test_missing_file_and_broken_yaml_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config([tmp_path / "nope.yaml"])
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config([broken])


def test_an_overlay_missing_here_is_the_shipped_one_and_a_local_file_wins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no conf/ folder here, as for a user of the installed wheel
    cfg = load_config(["conf/local.yaml", "profiles/accurate.yaml"])
    assert cfg.sources[1:] == (str(ROOT / "conf/local.yaml"), str(ROOT / "conf/profiles/accurate.yaml"))
    assert cfg.train.epochs == 15
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf/local.yaml").write_text("train:\n  epochs: 5\n")
    cfg = load_config(["conf/local.yaml"])
    assert cfg.sources[-1] == "conf/local.yaml" and cfg.train.epochs == 5


def test_an_overlay_found_nowhere_lists_the_shipped_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as err:
        load_config(["conf/lcoal.yaml"])
    assert str(err.value) == ("config file not found: conf/lcoal.yaml (shipped overlays: conf/cluster.yaml, "
                              "conf/databricks.yaml, conf/local.yaml, conf/profiles/accurate.yaml, "
                              "conf/profiles/photos.yaml, conf/profiles/tuned.yaml, conf/tune/accuracy.yaml, "
                              "conf/tune/cnn.yaml)")


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


def test_cli_config_error_is_one_line_and_exit_2():
    res = _cli("train", "--conf", "conf/local.yaml", "--set", "train.epochs=-1")
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == ["config error: --set: 'train.epochs' must be at least 1"]
    assert "Traceback" not in res.stderr


def test_cli_print_config_shows_the_effective_values():
    res = _cli("ingest", "--conf", "conf/local.yaml", "--set", "ingest.name=mine", "--print-config")
    assert res.stdout.splitlines()[0] == f"# merged from: {ROOT / 'conf/base.yaml'}, conf/local.yaml and --set"
    assert res.returncode == 0, res.stderr
    assert "name: mine" in res.stdout and "tracking_uri: sqlite:///var/mlflow.db" in res.stdout


def test_cli_help_lists_subcommands():
    res = _cli("--help")
    for sub in ("ingest", "train", "evaluate", "infer", "serve", "tune", "workflow", "ui", "cluster"):
        assert sub in res.stdout


def test_tune_without_a_space_is_a_config_error_naming_the_key():
    res = _cli("tune", "--conf", "conf/local.yaml")
    assert res.returncode == 2
    assert res.stderr.strip().startswith("config error: tune.space is empty")


def test_experiment_list_names_the_catalogue():
    res = _cli("experiment", "--list")
    assert res.returncode == 0, res.stderr
    assert [line.split()[0] for line in res.stdout.splitlines()][:3] == ["activations", "batch_size", "depth"]


def test_bare_on_and_off_mean_the_words_not_booleans():
    assert load_config([], ["train.mixed_precision=on"]).train.mixed_precision == "on"
    assert load_config([], ["train.mixed_precision=off"]).train.mixed_precision == "off"
