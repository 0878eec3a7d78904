"""`sparkvision experiment`: variants x seeds as child runs trained in Spark tasks, with plots and a table."""
import csv

import mlflow
import pytest
import yaml

from pipelines.config import ConfigError
from pipelines.tune.experiment import list_experiments, load_experiment, run_experiment
from tests.conftest import make_config

pytestmark = [pytest.mark.slow]


def test_the_catalogue_lists_every_faq_question_and_each_parses():
    names = {name for name, _ in list_experiments()}
    assert names == {"optimizers", "activations", "loss", "batch_size", "learning_rate", "normalization",
                     "overfitting", "depth", "imbalance"}
    for name in names:
        exp = load_experiment(name)
        assert exp.question and len(exp.variants) >= 3


def test_a_malformed_experiment_is_a_config_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"variants": {"a": {"tune.epochs": 3}}}))
    with pytest.raises(ConfigError, match="'tune.epochs' is not a train.\\* or ingest.\\* key"):
        load_experiment(str(bad))
    with pytest.raises(ConfigError, match="no experiment 'nope'"):
        load_experiment("nope")


def test_an_experiment_on_a_slice_trains_every_variant_and_seed_and_writes_its_plots_and_table(spark, slice_data,
                                                                                                tmp_path):
    root, overrides = slice_data
    spec = tmp_path / "tiny.yaml"
    spec.write_text(yaml.safe_dump({
        "question": "adam or sgd?", "reach": 0.3, "per_class_recall": True,
        "set": {"tune.epochs": 2, "tune.max_train_rows": 1000},
        "variants": {"adam": {"train.optimizer": "adam"},
                     "sgd": {"train.optimizer": "sgd", "train.learning_rate": 0.05}}}))
    cfg = make_config(root, *overrides, "tune.seeds=[1, 2]")
    out = run_experiment(spark, cfg, str(spec), user_keys=("tune.epochs",))  # a --set of tune.epochs would win
    assert out["runs"] == {"finished": 4, "failed": 0}
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name("sparkvision").experiment_id
    children = client.search_runs([exp], f"tags.mlflow.parentRunId = '{out['parent_run_id']}'")
    assert sorted(r.info.run_name for r in children) == ["adam seed 1", "adam seed 2", "sgd seed 1", "sgd seed 2"]
    assert all(r.info.status == "FINISHED" and "test_accuracy" in r.data.metrics for r in children)
    assert {r.data.params["train.seed"] for r in children} == {"1", "2"}
    # the experiment's own tune.epochs stood, since user_keys named it as set by the user: it kept cfg's 1
    assert all(int(r.data.metrics["epochs_run"]) == 1 for r in children)
    with open(out["table_csv"]) as fh:
        rows = list(csv.DictReader(fh))
    assert [r["variant"] for r in rows] == ["adam", "sgd"]
    assert all(0 < float(r["val_accuracy_mean"]) <= 1 and r["runs"] == "2" for r in rows)
    assert "recall Shirt_mean" in rows[0] and "train_minus_val_mean" in rows[0]
    md = open(out["table_md"]).read()
    assert md.startswith("adam or sgd?") and "| adam | 2 |" in md and " ± " in md
    artifacts = {a.path for a in client.list_artifacts(out["parent_run_id"])}
    assert {"table.md", "table.csv", "accuracy.png", "loss.png", "tiny.yaml"} <= artifacts
    for png in ("accuracy_png", "loss_png"):
        assert open(out[png], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
