"""`infer.input_type: stream`: score image files as they arrive in a folder, with Structured Streaming.

Spark's file source (`readStream.format("binaryFile")`) lists the new files of each micro-batch; each micro-batch is
decoded and quarantined as batch inference on files does (`pipelines.raw_files`) and scored with `predict()`. Its
output is committed by renaming one folder per micro-batch into place (`batch_id=N`, next to `_quarantine/` and the
query's `_checkpoint/`): Spark replays a micro-batch that was not marked done, and a replay of one already committed
writes nothing, so every file is scored exactly once across kills and restarts.

The model is pinned when the stream starts (`models:/NAME@champion` resolved to its version): a new champion is
picked up by starting the stream again, which goes on from its checkpoint.
"""
from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from pipelines import tracking
from pipelines.config import Config
from pipelines.console import say
from pipelines.errors import PipelineError, first_line
from pipelines.inference.job import QUARANTINE_DIR, infer_tags, model_label
from pipelines.inference.predict import predict
from pipelines.raw_files import (RAW_SCHEMA, decode_candidates, file_read_settings, image_spec, is_image,
                                 is_image_name, local_path, unlabelled_candidates)
from pipelines.signals import Stopped, call_on_signals
from pipelines.spark import scoped_conf

CHECKPOINT_DIR = "_checkpoint"  # the query's offsets and commits: keep it with the output it describes
STAGING_DIR = "_staging"
BATCH_COLUMN = "batch_id"
BINARY_FILE_SCHEMA = "path string, modificationTime timestamp, length long, content binary"  # binaryFile's own


def batch_folder(output: Path, batch_id: int) -> Path:
    """Where one committed micro-batch's predictions live (a partition folder: readers get a batch_id column)."""
    return output / f"{BATCH_COLUMN}={batch_id:06d}"


class MicroBatchSink:
    """foreachBatch body: decode, score and commit one micro-batch, and keep the stream's totals (Spark calls it for
    one micro-batch at a time)."""

    def __init__(self, cfg: Config, model: Any, output: Path):
        self.cfg, self.model, self.output = cfg, model, output
        self.spec = image_spec(cfg, model.shape)
        self.totals = {"batches": 0, "files": 0, "rows_scored": 0, "rows_quarantined": 0}
        self.run_id: str | None = None  # the stream's MLflow run: foreachBatch runs in another thread than the job

    def write(self, batch: DataFrame, batch_id: int) -> None:
        if batch_folder(self.output, batch_id).exists():
            return  # committed before a restart; Spark replays it because the commit log did not say so yet
        started = time.time()
        files = batch.where(is_image())
        arrived_at = F.col("modificationTime").cast("double")  # seconds, with their fraction
        arrived = files.select("path", "modificationTime").agg(  # no file contents read for this
            F.count(F.lit(1)).alias("n"), F.min(arrived_at).alias("first"),
            F.percentile_approx(arrived_at, 0.5).alias("median")).first()
        if arrived["n"] == 0 and not empty_files(self.output / CHECKPOINT_DIR, batch_id):
            return
        scored, quarantined = self._commit(files, batch_id)
        self._report(batch_id, arrived, scored, quarantined, time.time() - started)

    def _commit(self, files: DataFrame, batch_id: int) -> tuple[int, int]:
        """Write the batch's predictions and quarantine beside the output, then rename them into place: the rename
        of the predictions is the commit. Returns (rows scored, files quarantined)."""
        ic = self.cfg.infer
        candidates = with_empty_files(unlabelled_candidates(files), self.output / CHECKPOINT_DIR, batch_id)
        decoded = decode_candidates(candidates, self.spec).persist()
        staging = self.output / STAGING_DIR / f"{batch_id:06d}"
        try:
            shutil.rmtree(staging, ignore_errors=True)
            good = decoded.where(F.col("reason").isNull()).select(
                F.col("path").alias("source_path"), F.col("content_hash").alias("id"), "image")
            predict(good, self.model.load_uri, top_k=ic.top_k, batch_size=ic.batch_size).write.parquet(
                (staging / "scored").as_uri())
            bad = decoded.where(F.col("reason").isNotNull()).select("path", "reason", "detail")
            bad.coalesce(1).write.parquet((staging / "quarantine").as_uri())
            counts = decoded.agg(F.count(F.when(F.col("reason").isNull(), 1)).alias("good"),
                                 F.count("reason").alias("bad")).first()
        finally:
            decoded.unpersist()
        quarantine = self.output / QUARANTINE_DIR / batch_folder(Path(), batch_id)
        shutil.rmtree(quarantine, ignore_errors=True)  # an attempt that died between the two renames
        quarantine.parent.mkdir(parents=True, exist_ok=True)
        os.rename(staging / "quarantine", quarantine)
        os.rename(staging / "scored", batch_folder(self.output, batch_id))
        shutil.rmtree(staging, ignore_errors=True)
        return int(counts["good"]), int(counts["bad"])

    def _report(self, batch_id: int, arrived: Any, scored: int, quarantined: int, seconds: float) -> None:
        """One line and the MLflow metrics (step = micro-batch) for a committed micro-batch."""
        from mlflow import MlflowClient
        from mlflow.entities import Metric

        now = time.time()
        first, median = arrived["first"], arrived["median"]  # None when only zero-length files arrived
        latency_max, latency_p50 = (now - float(first), now - float(median)) if first is not None else (0.0, 0.0)
        rate = scored / seconds if seconds else 0.0
        files = scored + quarantined  # every image file of the micro-batch is one or the other
        for key, n in (("batches", 1), ("files", files), ("rows_scored", scored), ("rows_quarantined", quarantined)):
            self.totals[key] += n
        metrics = {"batch_rows_scored": scored, "batch_rows_quarantined": quarantined, "batch_rows_per_second": rate,
                   "arrival_to_output_p50_s": latency_p50, "arrival_to_output_max_s": latency_max}
        MlflowClient().log_batch(self.run_id, metrics=[Metric(k, float(v), int(now * 1000), batch_id)
                                                       for k, v in metrics.items()])
        say("infer", f"micro-batch {batch_id}: {files} files, {quarantined} quarantined, {rate:.0f} rows/s, "
                     f"arrival to output p50 {latency_p50:.1f}s, max {latency_max:.1f}s")


def empty_files(checkpoint: Path, batch_id: int) -> list[str]:
    """The zero-length image files Spark's file source gave this micro-batch. Its scan drops them, so they are found
    in the source's own log of the micro-batch's files (a JSON line per file, `N` or, every tenth batch, compacted in
    `N.compact`), to be quarantined as `empty_file` as batch inference on a folder does."""
    log = checkpoint / "sources" / "0"
    found = next((f for f in (log / str(batch_id), log / f"{batch_id}.compact") if f.is_file()), None)
    if found is None:
        return []
    entries = [json.loads(line) for line in found.read_text().splitlines()[1:] if line.startswith("{")]
    paths = [e["path"] for e in entries if e.get("batchId") == batch_id and is_image_name(e["path"])]
    return [p for p in paths if p.startswith("file:") and os.path.getsize(local_path(p)) == 0]


def with_empty_files(candidates: DataFrame, checkpoint: Path, batch_id: int) -> DataFrame:
    """The micro-batch's candidate rows plus a row (empty content) for each zero-length file it was given."""
    empty = empty_files(checkpoint, batch_id)
    if not empty:
        return candidates
    rows = [(p, None, None, bytearray(), None, None) for p in empty]
    return candidates.unionByName(candidates.sparkSession.createDataFrame(rows, RAW_SCHEMA))


def stream_source(path: str | None) -> str:
    """The folder a stream watches, or a clear error."""
    if not path:
        raise PipelineError("infer.input_type=stream needs infer.input: the folder where image files arrive")
    if "://" not in path and not os.path.isdir(path):
        raise PipelineError(f"infer.input={path}: no such folder to watch for arriving image files")
    return path


def start_query(spark: SparkSession, cfg: Config, source: str, output: Path, sink: MicroBatchSink):
    """The streaming query: new files of `source` -> sink.write, checkpointed under the output."""
    ic = cfg.infer
    files = (spark.readStream.format("binaryFile").schema(BINARY_FILE_SCHEMA).option("recursiveFileLookup", "true")
             .option("maxFilesPerTrigger", ic.max_files_per_trigger).load(source))
    writer = files.writeStream.foreachBatch(sink.write).option("checkpointLocation", str(output / CHECKPOINT_DIR))
    if ic.trigger == "available_now":
        writer = writer.trigger(availableNow=True)
    else:
        writer = writer.trigger(processingTime=f"{ic.trigger_seconds:g} seconds")
    return writer.start()


def await_query(query: Any) -> int | None:
    """Wait until the query ends (available_now) or a stop signal arrives; then stop it after the micro-batch in
    flight. Returns the signal, if one stopped it."""
    stop = threading.Event()
    with call_on_signals(lambda _signum: stop.set()) as received:
        try:
            while query.isActive and not stop.is_set():
                query.awaitTermination(0.5)
            while stop.is_set() and query.isActive and query.status["isTriggerActive"]:
                time.sleep(0.2)  # the micro-batch in flight commits first
            query.stop()
        except Exception as exc:
            if not received:  # with the whole process group signalled, the JVM may be gone already
                raise PipelineError(f"the stream failed: {first_line(exc)}") from None
    if not received and query.exception() is not None:
        raise PipelineError(f"the stream failed: {first_line(query.exception())}")
    return received[0] if received else None


def run_stream(spark: SparkSession, cfg: Config, model: Any) -> dict[str, Any]:
    """Score the files arriving in infer.input with the model pinned at the start, until stopped (processing_time)
    or until what has arrived is scored (available_now)."""
    import mlflow

    started = time.perf_counter()
    ic = cfg.infer
    source = stream_source(ic.input)
    output = Path(ic.output or Path(cfg.paths.predictions_root) / "stream").resolve()
    sink = MicroBatchSink(cfg, model, output)
    every = ("scoring what has arrived, then stopping" if ic.trigger == "available_now" else
             f"a micro-batch every {ic.trigger_seconds:g}s until stopped")
    with tracking.run(cfg, "infer", tags={**infer_tags(model, output), "pinned_model_uri": model.load_uri},
                      run_name=f"infer {model_label(model)} on stream {source}") as active:
        sink.run_id = active.info.run_id
        mlflow.log_params({"input_type": "stream", "input": source, "model_uri": model.uri,
                           "model_version": model.version or "", "trigger": ic.trigger,
                           "trigger_seconds": ic.trigger_seconds, "max_files_per_trigger": ic.max_files_per_trigger})
        say("infer", f"streaming {source} -> {output}: {model.uri} pinned to {model.load_uri}, {every}")
        with scoped_conf(spark, file_read_settings(cfg, spark.sparkContext.defaultParallelism)):
            signum = await_query(start_query(spark, cfg, source, output, sink))
        mlflow.log_metrics({k: float(v) for k, v in sink.totals.items()})
        if signum:
            raise Stopped(signum, f"the stream stopped after {sink.totals['batches']} micro-batch(es) this run; "
                                  f"start it again with infer.output={output} to go on")
    took = time.perf_counter() - started
    say("infer", f"stream done: {sink.totals['rows_scored']} rows scored, {sink.totals['rows_quarantined']} "
                 f"quarantined in {sink.totals['batches']} micro-batch(es) -> {output} ({took:.0f}s)")
    return {"stage": "infer", "input_type": "stream", "output": str(output), "run_id": sink.run_id, **sink.totals,
            "model_uri": model.uri, "model_version": model.version, "seconds": round(took, 1)}
