"""Scoring image files as they arrive: Structured Streaming over a folder, exactly once across stops and kills."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from mlflow import MlflowClient
from PIL import Image

from pipelines.inference.job import run_infer
from pipelines.ingest.job import run_ingest
from pipelines.train.job import run_train
from tests.conftest import make_config
from tests.fixtures import write_idx_slice

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


@pytest.fixture(scope="module")
def champion(tmp_path_factory, spark):
    """A small model, trained for one epoch and made champion."""
    root = tmp_path_factory.mktemp("stream")
    src = write_idx_slice(root / "idx", train=600, test=100)
    overrides = [f"ingest.source.path={src}", "ingest.row_group_rows=100", "ingest.files_per_split=1",
                 "train.batch_size=32", "train.epochs=1", "train.num_proc=1", "train.warmup_epochs=0",
                 "train.width=0.25", "mlflow.system_metrics_seconds=0"]
    run_ingest(spark, make_config(root, *overrides))
    out = run_train(spark, make_config(root, *overrides))
    MlflowClient().set_registered_model_alias(out["registered_model"], "champion", out["version"])
    return root, overrides, out


def stream_cfg(champion, inbox, output, *extra):
    root, overrides, _ = champion
    return make_config(root, *overrides, "infer.input_type=stream", f"infer.input={inbox}", f"infer.output={output}",
                       "infer.max_files_per_trigger=10", *extra)


def drop(inbox, names, corrupt=False):
    """Files arriving as a writer should deliver them: written beside the folder, then renamed into it."""
    inbox.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(names))
    for name in names:
        tmp = inbox.parent / f".{name}.part"
        if corrupt:
            tmp.write_bytes(b"not an image at all")
        else:
            Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8)).save(tmp, "PNG")
        os.rename(tmp, inbox / name)


def scored_paths(spark, output) -> list[str]:
    return [r["source_path"].rsplit("/", 1)[1] for r in spark.read.parquet(str(output)).select("source_path").collect()]


def test_available_now_scores_what_has_arrived_like_batch_inference_then_stops(spark, champion, tmp_path):
    _, _, trained = champion
    inbox, output = tmp_path / "inbox", tmp_path / "out"
    drop(inbox, [f"good{i:02d}.png" for i in range(25)])
    drop(inbox, ["broken1.png", "broken2.jpg"], corrupt=True)
    (inbox / "notes.txt").write_text("not an image file")
    (inbox / "empty.png").write_bytes(b"")  # Spark's file scan drops it; the source's own log still lists it
    out = run_infer(spark, stream_cfg(champion, inbox, output, "infer.trigger=available_now"))
    assert (out["rows_scored"], out["rows_quarantined"], out["files"]) == (25, 3, 28)
    assert out["batches"] == 3  # 28 image files, at most 10 a micro-batch
    streamed = spark.read.parquet(str(output))
    assert {"source_path", "id", "pred_label", "pred_name", "probability", "top_k", "model_version",
            "batch_id"} <= set(streamed.columns)
    quarantine = spark.read.parquet(str(output / "_quarantine")).select("path", "reason").collect()
    assert sorted((r["path"].rsplit("/", 1)[1], r["reason"]) for r in quarantine) == [
        ("broken1.png", "not_an_image"), ("broken2.jpg", "not_an_image"), ("empty.png", "empty_file")]
    batch = run_infer(spark, make_config(champion[0], *champion[1], "infer.input_type=files", f"infer.input={inbox}",
                                         f"infer.output={tmp_path / 'batch'}"))
    assert batch["rows_quarantined"] == out["rows_quarantined"]  # the same files quarantined
    expect = {r["source_path"]: (r["pred_label"], r["probability"])
              for r in spark.read.parquet(batch["output"]).select("source_path", "pred_label", "probability").collect()}
    got = {r["source_path"]: (r["pred_label"], r["probability"])
           for r in streamed.select("source_path", "pred_label", "probability").collect()}
    assert got.keys() == expect.keys()
    assert all(got[k][0] == expect[k][0] and abs(got[k][1] - expect[k][1]) < 1e-5 for k in got)
    run = MlflowClient().get_run(out["run_id"])
    assert run.info.run_name == f"infer v{trained['version']} on stream {inbox}"
    assert run.data.tags["pinned_model_uri"] == f"models:/{trained['registered_model']}/{trained['version']}"
    assert run.data.metrics["rows_scored"] == 25
    again = run_infer(spark, stream_cfg(champion, inbox, output, "infer.trigger=available_now"))
    assert again["rows_scored"] == again["batches"] == 0 and streamed.count() == 25  # nothing new, nothing twice


def stream_in_a_subprocess(champion, inbox, output):
    root, overrides, _ = champion
    sets = [f"paths.datasets_root={root}/datasets", f"paths.checkpoints_root={root}/checkpoints",
            f"mlflow.tracking_uri=sqlite:///{root}/mlflow.db", f"mlflow.artifact_location={root}/mlartifacts",
            *overrides, "infer.input_type=stream", f"infer.input={inbox}", f"infer.output={output}",
            "infer.trigger=processing_time", "infer.trigger_seconds=1", "infer.max_files_per_trigger=4"]
    return subprocess.Popen([sys.executable, "-m", "pipelines.cli", "infer", *(x for s in sets for x in ("--set", s))],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_for_batches(proc, n: int, lines: list[str], timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while sum(line.startswith("[infer] micro-batch") for line in lines) < n:
        assert time.monotonic() < deadline and proc.poll() is None, "".join(lines)
        lines.append(proc.stderr.readline())


@pytest.mark.fault('streaming inference stopped, then SIGKILLed, while files arrive', kind='fault',
                   shows='every file scored exactly once across the restarts')
def test_files_arriving_while_it_runs_are_scored_exactly_once_across_a_stop_and_a_kill(spark, champion, tmp_path):
    inbox, output = tmp_path / "inbox", tmp_path / "out"
    proc, lines = stream_in_a_subprocess(champion, inbox, output), []
    drop(inbox, [f"a{i}.png" for i in range(6)])  # arrive after the stream started
    wait_for_batches(proc, 1, lines)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, "".join(lines) + err
    assert err.strip().splitlines()[-1].startswith("stopped by SIGTERM: the stream stopped after ")
    assert "Traceback" not in "".join(lines) + err
    stopped = MlflowClient(tracking_uri=f"sqlite:///{champion[0]}/mlflow.db").search_runs(
        [MlflowClient().get_experiment_by_name("sparkvision").experiment_id], "tags.`sparkvision.stage` = 'infer'",
        order_by=["start_time DESC"], max_results=1)[0]
    assert stopped.info.status == "KILLED" and stopped.data.metrics["rows_scored"] >= 4
    drop(inbox, [f"b{i}.png" for i in range(6)])  # arrive while it is stopped
    proc, lines = stream_in_a_subprocess(champion, inbox, output), []
    wait_for_batches(proc, 1, lines)
    drop(inbox, [f"c{i}.png" for i in range(8)])
    time.sleep(1.5)
    os.killpg(proc.pid, signal.SIGKILL)  # mid-stream, maybe mid-batch: nothing runs on the way out
    proc.communicate(timeout=60)
    done = run_infer(spark, stream_cfg(champion, inbox, output, "infer.trigger=available_now"))
    paths = scored_paths(spark, output)
    assert sorted(paths) == sorted([f"{w}{i}.png" for w, n in (("a", 6), ("b", 6), ("c", 8)) for i in range(n)])
    assert done["rows_quarantined"] == 0
