"""Evaluation, the promotion gate and batch inference, with a model really trained by Horovod workers."""
import os

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from mlflow import MlflowClient

from pipelines.errors import PipelineError
from pipelines.inference.evaluate import run_evaluate
from pipelines.inference.job import run_infer
from pipelines.inference.predict import load_keras_model, predict
from tests.fixtures import is_loopback, listening_addresses
from pipelines.ingest.job import run_ingest
from pipelines.train.job import run_train
from tests.conftest import make_config
from tests.fixtures import build_image_tree, write_idx_slice

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, spark):
    root = tmp_path_factory.mktemp("infer")
    src = write_idx_slice(root / "idx", train=1500, test=400)
    overrides = [f"ingest.source.path={src}", "ingest.row_group_rows=150", "ingest.files_per_split=1",
                 "train.batch_size=32", "train.epochs=5", "train.num_proc=2", "train.warmup_epochs=0",
                 "train.width=0.5", "evaluate.threshold=0.3", "evaluate.misclassified_examples=12"]
    run_ingest(spark, make_config(root, *overrides))
    first = run_train(spark, make_config(root, *overrides))
    return root, overrides, first


def cfg_of(trained, *extra):
    root, overrides, _ = trained
    return make_config(root, *overrides, *extra)


def test_evaluate_logs_metrics_and_promotes_the_first_model(spark, trained):
    _, _, first = trained
    out = run_evaluate(spark, cfg_of(trained))
    assert out["model_version"] == first["version"]
    assert out["decision"] == "champion" and "no champion" in out["reason"] and out["has_champion"] is True
    assert 0.3 < out["metrics"]["accuracy"] <= out["metrics"]["top_k_accuracy"] <= 1
    client = MlflowClient()
    run = client.get_run(out["run_id"])
    assert run.data.tags["mlflow.parentRunId"] == first["run_id"]
    assert run.info.run_name == f"evaluate v{first['version']} on {first['dataset']}:test"
    (evaluated,) = run.inputs.dataset_inputs  # lineage: the split it scored
    assert evaluated.dataset.name == f"{first['dataset']}:test"
    assert {t.key: t.value for t in evaluated.tags}["mlflow.data.context"] == "evaluation"
    assert run.data.metrics["test_accuracy"] == pytest.approx(out["metrics"]["accuracy"])
    assert "f1_T_shirt_top" in run.data.metrics
    arts = {a.path for a in client.list_artifacts(out["run_id"])}
    assert {"confusion_matrix.png", "misclassified.png", "classification_report.txt", "promotion.json"} <= arts
    name = cfg_of(trained).mlflow.registered_model
    assert str(client.get_model_version_by_alias(name, "champion").version) == first["version"]


@pytest.fixture(scope="module")
def weak(spark, trained):
    """A second version, trained for one epoch at a tiny rate: far worse than the first."""
    return run_train(spark, cfg_of(trained, "train.epochs=1", "train.learning_rate=0.00001"))


def test_gate_refuses_a_model_below_threshold_and_one_that_does_not_beat_the_champion(spark, trained, weak):
    _, _, first = trained
    name, uri = weak["registered_model"], f"models:/{weak['registered_model']}/{weak['version']}"
    client = MlflowClient()
    assert str(client.get_model_version_by_alias(name, "champion").version) == first["version"]  # the first test's
    below = run_evaluate(spark, cfg_of(trained, f"evaluate.model_uri={uri}", "evaluate.threshold=0.999"))
    assert below["decision"] == "challenger" and "below the threshold 0.9990" in below["reason"]
    assert below["has_champion"] is True  # refused, but the first version is still champion: infer can run
    worse = run_evaluate(spark, cfg_of(trained, f"evaluate.model_uri={uri}", "evaluate.threshold=0.0"))
    assert worse["decision"] == "challenger"
    assert f"does not beat champion version {first['version']}" in worse["reason"]
    assert worse["champion_accuracy"] > worse["metrics"]["accuracy"]
    assert str(client.get_model_version_by_alias(name, "challenger").version) == weak["version"]
    assert str(client.get_model_version_by_alias(name, "champion").version) == first["version"]


def test_the_champion_is_scored_again_only_when_no_evaluation_of_it_on_this_split_was_recorded(spark, trained, weak):
    _, _, first = trained
    name, uri = weak["registered_model"], f"models:/{weak['registered_model']}/{weak['version']}"
    client = MlflowClient()
    tags = client.get_model_version(name, first["version"]).tags
    assert tags["test_accuracy_on"] == f"{first['dataset']}:test"  # recorded by the first evaluation
    client.set_model_version_tag(name, first["version"], "test_accuracy", "0.987654")
    try:
        reused = run_evaluate(spark, cfg_of(trained, f"evaluate.model_uri={uri}", "evaluate.threshold=0.0"))
        assert reused["champion_accuracy"] == pytest.approx(0.987654)  # the recorded figure, not a new scoring
        client.set_model_version_tag(name, first["version"], "test_accuracy_on", "another/v0009:test")
        scored = run_evaluate(spark, cfg_of(trained, f"evaluate.model_uri={uri}", "evaluate.threshold=0.0"))
        assert scored["champion_accuracy"] == pytest.approx(float(tags["test_accuracy"]), abs=1e-6)
    finally:
        for key in ("test_accuracy", "test_accuracy_on"):
            client.set_model_version_tag(name, first["version"], key, tags[key])


def test_a_challenger_that_beats_the_champion_is_promoted(spark, trained, weak):
    _, _, first = trained
    name = weak["registered_model"]
    client = MlflowClient()
    client.set_registered_model_alias(name, "champion", weak["version"])  # as if promoted at a lower threshold
    try:
        out = run_evaluate(spark, cfg_of(trained, f"evaluate.model_uri=models:/{name}/{first['version']}",
                                         "evaluate.threshold=0.3"))
        assert out["decision"] == "champion" and out["champion_version_before"] == weak["version"]
        assert f"beats champion version {weak['version']}" in out["reason"]
        assert out["metrics"]["accuracy"] > out["champion_accuracy"]
        assert str(client.get_model_version_by_alias(name, "champion").version) == first["version"]
    finally:
        client.set_registered_model_alias(name, "champion", first["version"])  # the later tests score the first


def test_the_misclassified_grid_samples_the_whole_split_the_same_way_every_run(spark):
    from pipelines.inference.evaluate import misclassified_sample

    scored = spark.range(0, 2000, numPartitions=4).selectExpr("id", "0 as label", "if(id % 2 = 0, 1, 0) as pred_label")
    ids = [r["id"] for r in misclassified_sample(scored, 12).collect()]
    assert len(ids) == 12 and all(i % 2 == 0 for i in ids)  # misclassified rows only
    assert ids != list(range(0, 24, 2)) and max(ids) > 1000  # not the first rows by id
    assert [r["id"] for r in misclassified_sample(scored, 12).collect()] == ids


def test_infer_agrees_with_evaluate_and_in_process_predict(spark, trained, tmp_path):
    _, _, first = trained
    cfg = cfg_of(trained, f"evaluate.model_uri=runs:/{first['run_id']}/model",
                 f"infer.model_uri=runs:/{first['run_id']}/model", f"infer.output={tmp_path}/preds",
                 "infer.key_columns=[id, label]")
    evaluated = run_evaluate(spark, cfg)
    out = run_infer(spark, cfg)
    assert out["rows_scored"] == evaluated["rows"]
    preds = pq.read_table(out["output"]).to_pandas()
    assert (preds["pred_label"] == preds["label"]).mean() == pytest.approx(evaluated["metrics"]["accuracy"], abs=0)
    assert {"pred_name", "probability", "top_k", "model_uri", "model_version"} <= set(preds.columns)
    run = MlflowClient().get_run(out["run_id"])  # lineage: dataset split -> model version -> predictions
    assert run.info.run_name == f"infer v{first['version']} on {first['dataset']}:test"
    assert run.data.tags["output"] == out["output"] and run.data.metrics["rows_scored"] == out["rows_scored"]
    assert [i.dataset.name for i in run.inputs.dataset_inputs] == [f"{first['dataset']}:test"]
    # in-process predict of the same model on the same rows
    test_dir = out["output"]  # ids come from the test split of the dataset
    from pipelines.dataset.contract import resolve_dataset

    ds = resolve_dataset(cfg.paths.datasets_root, "fashion_mnist")
    rows = pq.read_table(ds.split_path("test")).to_pandas()
    pixels = np.stack([np.frombuffer(b, np.uint8) for b in rows["image"]]).reshape(-1, 28, 28, 1)
    model = load_keras_model(f"models:/{first['registered_model']}/{first['version']}")
    local = pd.DataFrame({"id": rows["id"], "local": model.predict(pixels, verbose=0).argmax(1)})
    merged = preds.merge(local, on="id")
    assert len(merged) == len(preds) and test_dir
    assert (merged["pred_label"] == merged["local"]).all()


def test_predict_api_on_a_users_dataframe(spark, trained):
    _, _, first = trained
    from pipelines.dataset.contract import resolve_dataset

    ds = resolve_dataset(cfg_of(trained).paths.datasets_root, "fashion_mnist")
    df = spark.read.parquet(ds.split_path("test").as_uri()).limit(50)
    out = predict(df, f"models:/{first['registered_model']}/{first['version']}", top_k=2)
    row = out.select("pred_label", "pred_name", "probability", "top_k", "model_version").first()
    assert len(row["top_k"]) == 2 and row["top_k"][0]["label"] == row["pred_label"]
    assert row["model_version"] == first["version"]
    assert "image" not in out.columns


def test_the_registered_model_scores_with_mlflow_spark_udf_as_predict_does(spark, trained):
    """MLflow users' own way: mlflow.pyfunc.spark_udf on the registered model, fed by pixel_array."""
    import mlflow
    from pyspark.sql import functions as F

    from pipelines.dataset.contract import resolve_dataset
    from pipelines.inference import pixel_array

    _, _, first = trained
    uri = f"models:/{first['registered_model']}/{first['version']}"
    ds = resolve_dataset(cfg_of(trained).paths.datasets_root, "fashion_mnist")
    df = spark.read.parquet(ds.split_path("test").as_uri()).limit(200)
    # result_type: MLflow infers array<array<float>> from the (-1, 10) output tensor, then fails on each row's 1-D one
    probs = mlflow.pyfunc.spark_udf(spark, uri, result_type="array<float>", env_manager="local")
    by_udf = df.select("id", probs(pixel_array("image")).alias("probs")).toPandas()
    by_predict = predict(df, uri, top_k=1).select("id", "pred_label", "probability").toPandas()
    merged = by_udf.merge(by_predict, on="id")
    assert len(merged) == 200
    assert (merged["probs"].map(np.argmax) == merged["pred_label"]).all()
    assert np.allclose(merged["probs"].map(max), merged["probability"], atol=1e-5)
    sizes = df.select(F.size(pixel_array("image")).alias("n")).agg(F.min("n"), F.max("n")).first()
    assert tuple(sizes) == (28 * 28, 28 * 28)  # every row, not one of them


@pytest.mark.fault('what `sparkvision serve` listens on', kind='security', shows='127.0.0.1 only')
def test_serve_answers_rest_requests_like_the_model_and_stops_on_ctrl_c(trained, tmp_path):
    """`sparkvision serve`: MLflow's scoring server on 127.0.0.1, quiet, one line; a taken port is a clear error."""
    import json
    import signal
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    from pipelines.dataset.contract import resolve_dataset

    root, _, first = trained
    uri = f"models:/{first['registered_model']}/{first['version']}"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "pipelines.cli", "serve", "--model", uri, "--port", str(port),
           "--set", f"mlflow.tracking_uri=sqlite:///{root}/mlflow.db"]
    env = {**os.environ, "TMPDIR": str(tmp_path)}  # where the server keeps its copy of the model
    server = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and server.poll() is None:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
                break
            except OSError:
                time.sleep(1)
        assert server.poll() is None, server.communicate()
        listening = listening_addresses(server.pid)
        assert ("127.0.0.1", port) in listening and all(is_loopback(ip) for ip, _ in listening), listening
        assert len(list(tmp_path.glob("sparkvision-serve-*"))) == 1
        taken = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert taken.returncode == 1 and f"cannot serve on 127.0.0.1:{port}: address already in use" in taken.stderr
        rows = pq.read_table(resolve_dataset(f"{root}/datasets", "fashion_mnist").split_path("test"),
                             columns=["image"]).slice(0, 20)
        pixels = np.stack([np.frombuffer(b, np.uint8) for b in rows.column("image").to_pylist()]).reshape(-1, 28, 28, 1)
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations",
                                         json.dumps({"inputs": pixels.tolist()}).encode(),
                                         {"Content-Type": "application/json"})
        served = np.array(json.loads(urllib.request.urlopen(request, timeout=60).read())["predictions"])
        local = load_keras_model(uri).predict(pixels, verbose=0)
        assert served.shape == (20, 10) and np.allclose(served, local, atol=1e-5)
    finally:
        server.send_signal(signal.SIGINT)
        out, err = server.communicate(timeout=60)
    assert server.returncode == 130
    lines = err.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"[serve] {uri} (version {first['version']} of ") and \
        lines[1] == "stopped by SIGINT", err
    assert out == ""  # no per-request Keras progress bar
    assert not list(tmp_path.glob("sparkvision-serve-*"))  # its copy of the model is gone with it


def test_infer_reads_a_catalog_table_by_name(spark, trained, tmp_path):
    _, _, first = trained
    from pipelines.dataset.contract import resolve_dataset

    cfg = cfg_of(trained)
    ds = resolve_dataset(cfg.paths.datasets_root, "fashion_mnist")
    (spark.read.parquet(ds.split_path("test").as_uri()).limit(40)
     .withColumnRenamed("image", "pixels").withColumnRenamed("id", "item")
     .createOrReplaceTempView("items_to_score"))
    out = run_infer(spark, cfg_of(trained, "infer.input_type=table", "infer.input=items_to_score",
                                  "infer.image_column=pixels", "infer.key_columns=[item]",
                                  f"infer.model_uri=models:/{first['registered_model']}/{first['version']}",
                                  f"infer.output={tmp_path}/table-preds"))
    preds = pq.read_table(out["output"]).to_pandas()
    assert out["rows_scored"] == 40 and len(preds) == 40 and preds["item"].nunique() == 40
    with pytest.raises(PipelineError, match="no table or view 'no_such_table'"):
        run_infer(spark, cfg_of(trained, "infer.input_type=table", "infer.input=no_such_table",
                                f"infer.model_uri=models:/{first['registered_model']}/{first['version']}",
                                f"infer.output={tmp_path}/none"))
    assert not (tmp_path / "none").exists()


def test_infer_on_raw_files_quarantines_bad_ones(spark, trained, tmp_path):
    tree = tmp_path / "photos"
    expected = build_image_tree(tree)
    cfg = cfg_of(trained, "infer.input_type=files", f"infer.input={tree}", f"infer.output={tmp_path}/raw-preds",
                 "ingest.max_pixels=4000000")
    out = run_infer(spark, cfg)
    assert out["rows_quarantined"] == (expected["empty_file"] + expected["truncated"] + expected["not_an_image"]
                                       + expected["too_many_pixels"])
    assert out["rows_scored"] > 10
    q = pq.read_table(f"{tmp_path}/raw-preds/_quarantine").to_pandas()
    assert set(q["reason"]) == {"empty_file", "truncated", "not_an_image", "too_many_pixels"}


@pytest.mark.fault('an inference input that is wrong: {message}', kind='bad_input', shows='one error, nothing written')
@pytest.mark.parametrize("extra, message", [
    (["infer.model_uri=models:/nope/7"], "model models:/nope/7 not found"),
    (["infer.input_type=table", "infer.input={tmp}/table", "infer.image_column=pixels"], "no image column 'pixels'"),
    (["infer.input_type=table", "infer.input={tmp}/wrong_shape", "infer.key_columns=[id]"], "do not match the model input 28x28x1"),
    (["infer.input_type=table", "infer.input={tmp}/empty", "infer.key_columns=[id]"], "the input is empty"),
])
def test_bad_inference_inputs_fail_clearly_and_write_nothing(spark, trained, tmp_path, extra, message):
    _, _, first = trained
    spark.createDataFrame([("a", bytearray(784))], "id string, image binary").write.parquet(f"{tmp_path}/table")
    spark.createDataFrame([("a", bytearray(100))], "id string, image binary").write.parquet(f"{tmp_path}/wrong_shape")
    spark.createDataFrame([], "id string, image binary").write.parquet(f"{tmp_path}/empty")
    cfg = cfg_of(trained, f"infer.model_uri=runs:/{first['run_id']}/model", f"infer.output={tmp_path}/out",
                 *[e.format(tmp=tmp_path) for e in extra])
    with pytest.raises(PipelineError, match=message):
        run_infer(spark, cfg)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if "staging" in p.name]


@pytest.mark.fault('a published dataset whose files no longer match its manifest', kind='fault',
                   shows='train and evaluate refuse it before starting, naming the changed, missing or extra file')
def test_a_dataset_whose_files_no_longer_match_its_manifest_is_refused_naming_the_file(spark, trained, tmp_path):
    import shutil

    import mlflow

    root, _, first = trained
    shutil.copytree(f"{root}/datasets", tmp_path / "datasets")  # this test damages its own copy
    cfg = cfg_of(trained, f"paths.datasets_root={tmp_path}/datasets",
                 f"evaluate.model_uri=runs:/{first['run_id']}/model")
    version = next(p for p in (tmp_path / "datasets" / "fashion_mnist").iterdir() if p.name.startswith("v"))
    runs_before = len(mlflow.search_runs(search_all_experiments=True))
    test_file = sorted((version / "test").glob("*.parquet"))[0]
    with open(test_file, "r+b") as fh:  # same size, one byte of the footer changed
        fh.seek(-12, 2)
        byte = fh.read(1)
        fh.seek(-12, 2)
        fh.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(PipelineError, match=rf"dataset fashion_mnist/{version.name} does not match its manifest: "
                                            rf"test/{test_file.name} has changed \(same size, different footer\)"):
        run_evaluate(spark, cfg)
    removed = sorted((version / "validation").glob("*.parquet"))[0]
    removed.unlink()
    with pytest.raises(PipelineError, match=rf"validation/{removed.name} is missing under {version}; re-ingest"):
        run_train(spark, cfg)
    (version / "train" / "extra.parquet").write_bytes(b"PAR1")
    with pytest.raises(PipelineError, match=r"train/extra.parquet is not in the manifest"):
        run_train(spark, cfg)
    assert len(mlflow.search_runs(search_all_experiments=True)) == runs_before  # refused before any run started
