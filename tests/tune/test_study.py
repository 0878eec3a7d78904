"""`sparkvision tune`: real Optuna studies in MLflow whose trials train as Spark tasks (one-worker Horovod)."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

from pipelines.config import load_config
from pipelines.tune.study import run_tune
from tests.conftest import make_config

pytestmark = [pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
GOOD = {"train.optimizer": "adam", "train.learning_rate": 0.002}
BAD = {"train.optimizer": "sgd", "train.learning_rate": 50.0}  # diverges at once
SPACE = {"train.optimizer": {"choice": ["adam", "sgd"]}, "train.learning_rate": {"float": [1e-4, 50.0], "log": True}}


def tune_overrides(study, *extra):
    return [f"tune.study={study}", f"tune.space={json.dumps(SPACE)}", *extra]


def trial_runs(client, parent_id):
    exp = client.get_experiment_by_name("sparkvision").experiment_id
    return client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent_id}'")


def test_a_study_prunes_a_clearly_worse_trial_and_writes_a_best_yaml_that_train_loads(spark, slice_data):
    root, overrides = slice_data
    cfg = make_config(root, *overrides, *tune_overrides(
        "prune", "tune.trials=2", "tune.epochs=2", "tune.parallelism=1", "tune.pruner.startup_trials=1",
        "tune.pruner.warmup_epochs=0", f"tune.enqueue={json.dumps([GOOD, BAD])}"))
    out = run_tune(spark, cfg)
    client = mlflow.MlflowClient()
    parent = client.get_run(out["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.info.run_name == "prune"
    runs = {r.data.params["train.optimizer"]: r for r in trial_runs(client, out["parent_run_id"])}
    assert set(runs) == {"adam", "sgd"}
    assert runs["adam"].info.status == "FINISHED" and runs["adam"].data.metrics["value"] > 0.2  # chance is 0.1
    assert runs["sgd"].info.status == "KILLED" and runs["sgd"].data.tags["pruned_at_epoch"] == "1"  # pruned
    assert runs["adam"].data.metrics["val_accuracy"] == pytest.approx(out["best_value"])  # epochs logged per trial
    assert out["trials"] == {"finished": 1, "pruned": 1, "failed": 0}
    assert parent.data.metrics["best_val_accuracy"] == pytest.approx(out["best_value"])
    assert parent.data.tags["best.train.optimizer"] == "adam"
    artifacts = {a.path for a in client.list_artifacts(out["parent_run_id"])}
    assert {"best.yaml", "optimization_history.png"} <= artifacts
    best = load_config(["conf/local.yaml", out["best_yaml"]])  # the overlay `train` accepts as it is
    assert best.train.optimizer == "adam" and best.train.learning_rate == pytest.approx(0.002)
    assert not list(Path(out["best_yaml"]).parent.glob("trials/*/*.keras"))  # no trial weights kept


def test_trials_run_at_once_in_separate_spark_tasks_and_a_rerun_continues_the_study(spark, slice_data):
    root, overrides = slice_data
    cfg = make_config(root, *overrides, *tune_overrides("parallel", "tune.trials=2", "tune.parallelism=2"))
    first = run_tune(spark, cfg)
    client = mlflow.MlflowClient()
    runs = trial_runs(client, first["parent_run_id"])
    assert len(runs) == 2 and all(r.info.status in ("FINISHED", "KILLED") for r in runs)
    spans = [(int(r.data.tags["started_ms"]), r.info.end_time) for r in runs]
    assert max(s for s, _ in spans) < min(e for _, e in spans), f"the trials did not overlap: {spans}"
    assert len({r.data.tags["spark_task"] for r in runs}) == 2
    again = run_tune(spark, make_config(root, *overrides, *tune_overrides("parallel", "tune.trials=1",
                                                                         "tune.parallelism=1")))
    assert again["parent_run_id"] == first["parent_run_id"]  # resumed by name: the same parent run
    assert len(trial_runs(client, first["parent_run_id"])) == 3


def cli(root, overrides, *extra):
    sets = [x for s in (*overrides, *extra) for x in ("--set", s)]
    return [sys.executable, "-m", "pipelines.cli", "tune", *sets]


def test_sigterm_mid_study_leaves_no_running_run_and_no_process(slice_data):
    root, overrides = slice_data
    base = make_config(root, *overrides)
    args = [*(f"{k}={v}" for k, v in paths_of(root).items()), *overrides,
            *tune_overrides("stopped", "tune.trials=4", "tune.epochs=6", "tune.max_train_rows=0")]
    proc = subprocess.Popen(cli(root, args), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    mlflow.set_tracking_uri(base.mlflow.tracking_uri.replace("sqlite:///", "sqlite:///"))
    client = mlflow.MlflowClient(base.mlflow.tracking_uri)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and not any(  # wait until the trials are training (an epoch logged)
            "val_accuracy" in r.data.metrics for r in running_trials(client, "stopped")):
        time.sleep(1)
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "Traceback" not in err and "stopped by SIGTERM" in err
    exp = client.get_experiment_by_name("sparkvision").experiment_id
    runs = [r for r in client.search_runs([exp]) if r.info.run_name == "stopped"
            or r.data.tags.get("mlflow.parentRunId") == study_id(client, "stopped")]
    assert len(runs) >= 3 and {r.info.status for r in runs} == {"KILLED"}, [(r.info.run_name, r.info.status) for r in runs]
    left = subprocess.run(["pgrep", "-f", f"trial_process {root}"], capture_output=True, text=True)
    assert left.stdout.strip() == "", "a trial's training process outlived the study"


def paths_of(root):
    return {"paths.datasets_root": f"{root}/datasets", "paths.checkpoints_root": f"{root}/checkpoints",
            "paths.runs_root": f"{root}/runs", "paths.predictions_root": f"{root}/predictions",
            "paths.studies_root": f"{root}/studies", "mlflow.tracking_uri": f"sqlite:///{root}/mlflow.db",
            "mlflow.artifact_location": f"{root}/mlartifacts", "train.model": "mnist_cnn"}


def study_id(client, name):
    exp = client.get_experiment_by_name("sparkvision")
    found = [r for r in client.search_runs([exp.experiment_id]) if r.info.run_name == name] if exp else []
    return found[0].info.run_id if found else None


def running_trials(client, name):
    parent = study_id(client, name)
    if parent is None:
        return []
    exp = client.get_experiment_by_name("sparkvision").experiment_id
    return client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent}' and attributes.status = 'RUNNING'")


def test_when_every_trial_fails_the_job_exits_1_with_the_first_error_and_the_study_failed(slice_data, tmp_path):
    root, overrides = slice_data
    damaged = tmp_path / "datasets"
    shutil.copytree(root / "datasets", damaged)
    for f in (damaged / "fashion_mnist" / "v0001" / "train").glob("*.parquet"):
        f.write_bytes(b"not parquet")
    manifest = damaged / "fashion_mnist" / "v0001" / "manifest.json"  # as published before manifests listed their
    listed = json.loads(manifest.read_text())                            # files: the damage shows in the trials only
    listed.pop("files")
    manifest.write_text(json.dumps(listed))
    args = [*(f"{k}={v}" for k, v in paths_of(root).items()), *overrides, f"paths.datasets_root={damaged}",
            *tune_overrides("failing", "tune.trials=2", "tune.max_train_rows=0")]
    res = subprocess.run(cli(root, args), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 1, res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: every trial of study failing failed; the first:") and "not a readable Parquet" in last
    assert res.stderr.count("FAILED: ") == 2  # one line per trial
    client = mlflow.MlflowClient(f"sqlite:///{root}/mlflow.db")
    assert client.get_run(study_id(client, "failing")).info.status == "FAILED"
