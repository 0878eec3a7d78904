"""`sparkvision infer`: batch inference over a dataset split, raw image files, or any Parquet table."""
from __future__ import annotations

import os
import re
import shutil
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from pipelines.dataset.encoding import with_pixels
from pipelines import tracking
from pipelines.config import Config
from pipelines.console import say
from pipelines.dataset.contract import DatasetVersion, resolve_dataset
from pipelines.errors import PipelineError, first_line, root_cause
from pipelines.inference.models import CHAMPION, resolve_model
from pipelines.inference.predict import check_image_lengths, predict
from pipelines.raw_files import decode_candidates, file_read_settings, image_spec, list_files
from pipelines.spark import scoped_conf
from pipelines.storage import check_writable

QUARANTINE_DIR = "_quarantine"  # inside the output; Spark and pandas readers skip '_' folders


def default_model_uri(cfg: Config) -> str:
    return cfg.infer.model_uri or f"models:/{cfg.mlflow.registered_model}@{CHAMPION}"


def dataset_input(cfg: Config) -> tuple[DatasetVersion, str]:
    """infer.input for input_type=dataset, NAME[/VERSION][:split] -> (the version, the split); default: ingest.name's
    test split."""
    name_version, _, split = (cfg.infer.input or f"{cfg.ingest.name}:test").partition(":")
    return resolve_dataset(cfg.paths.datasets_root, name_version), split or "test"


def read_dataset_input(spark: SparkSession, cfg: Config) -> DataFrame:
    """That split's rows."""
    ds, split = dataset_input(cfg)
    return with_pixels(spark.read.parquet(ds.split_path(split).as_uri()), ds.manifest())


def read_files_input(spark: SparkSession, cfg: Config, shape: tuple[int, int, int]) -> tuple[DataFrame, DataFrame]:
    """Raw image files (a folder, recursively, or a glob) decoded as ingest decodes them -> (rows, quarantine)."""
    if not cfg.infer.input:
        raise PipelineError("infer.input_type=files needs infer.input (a folder or a glob of image files)")
    decoded = decode_candidates(list_files(spark, cfg.infer.input), image_spec(cfg, shape))
    good = decoded.where(F.col("reason").isNull()).select(
        F.col("path").alias("source_path"), F.col("content_hash").alias("id"), "image")
    bad = decoded.where(F.col("reason").isNotNull()).select("path", "reason", "detail")
    return good, bad


TABLE_NAME = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*){0,2}")  # table, db.table or catalog.schema.table


def read_table_input(spark: SparkSession, source: str | None) -> DataFrame:
    """infer.input for input_type=table: a table or view in the Spark catalog, or a Parquet path."""
    if not source:
        raise PipelineError("infer.input_type=table needs infer.input (a catalog table name or a Parquet path)")
    if TABLE_NAME.fullmatch(source) and not Path(source).exists():
        try:
            return spark.table(source)
        except Exception as exc:
            raise PipelineError(f"no table or view {source!r} in the Spark catalog: {first_line(exc)}") from None
    try:
        return spark.read.parquet(source)
    except Exception as exc:
        raise PipelineError(f"cannot read Parquet table {source}: {first_line(exc)}") from None


def _write_atomically(df: DataFrame, quarantine: DataFrame | None, output: Path, partition_by: list[str]) -> None:
    """Write to a hidden sibling folder, then rename into place: a failure leaves nothing at `output`."""
    if output.exists():
        raise PipelineError(f"output {output} already exists; choose another infer.output")
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = output.parent / f".{output.name}.staging-{uuid.uuid4().hex[:8]}"
    try:
        writer = df.write.mode("error")
        if partition_by:
            writer = writer.partitionBy(*partition_by)
        writer.parquet(staging.as_uri())
        if quarantine is not None:
            quarantine.coalesce(1).write.parquet((staging / QUARANTINE_DIR).as_uri())
        os.rename(staging, output)
    except Exception as exc:  # a full disk, a folder gone: the cause, not Spark's job-aborted wrapper
        raise PipelineError(f"writing the predictions to {output} failed ({root_cause(exc)}); nothing was written "
                            "there") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def run_infer(spark: SparkSession, cfg: Config) -> dict[str, Any]:
    """Score the configured input with the configured model (default: the champion) and write Parquet."""
    files = cfg.infer.input_type == "files"
    with scoped_conf(spark, file_read_settings(cfg, spark.sparkContext.defaultParallelism) if files else {}):
        return _infer(spark, cfg)


def _infer(spark: SparkSession, cfg: Config) -> dict[str, Any]:
    started = time.perf_counter()
    tracking.configure(cfg)
    ic = cfg.infer
    uri = default_model_uri(cfg)
    model = resolve_model(uri)
    if ic.input_type == "stream":
        from pipelines.inference.stream import run_stream

        return run_stream(spark, cfg, model)
    df, quarantine, n = read_input(spark, cfg, model)
    output = Path(ic.output or Path(cfg.paths.predictions_root) / datetime.now().strftime("%Y%m%d-%H%M%S")).resolve()
    check_writable(output.parent, "infer.output's folder")
    with tracking.run(cfg, "infer", tags=infer_tags(model, output),
                      run_name=f"infer {model_label(model)} on {input_label(cfg)}") as active:
        log_infer_input(cfg, model)
        scored = predict(df, uri, image_column=ic.image_column if ic.input_type == "table" else "image",
                         top_k=ic.top_k, batch_size=ic.batch_size)
        t0 = time.perf_counter()
        _write_atomically(scored, quarantine, output, ic.partition_by)
        seconds = time.perf_counter() - t0
        quarantined = spark.read.parquet((output / QUARANTINE_DIR).as_uri()).count() if quarantine is not None else 0
        rate = n / seconds if seconds else 0.0
        log_infer_metrics(n, quarantined, rate)
    say("infer", f"scored {n} rows with {uri} (version {model.version}) -> {output}: "
                 f"{quarantined} quarantined, {rate:.0f} images/s")
    return {"stage": "infer", "output": str(output), "rows_scored": n, "rows_quarantined": quarantined,
            "model_uri": uri, "model_version": model.version, "images_per_second": round(rate, 1),
            "run_id": active.info.run_id, "seconds": round(time.perf_counter() - started, 1)}


def read_input(spark: SparkSession, cfg: Config, model) -> tuple[DataFrame, DataFrame | None, int]:
    """The configured input as (rows to score: keys + image, quarantined files or None, row count), checked before
    anything is written or any run is opened."""
    ic = cfg.infer
    quarantine = None
    if ic.input_type == "dataset":
        df, image_column = read_dataset_input(spark, cfg), "image"
    elif ic.input_type == "files":
        (df, quarantine), image_column = read_files_input(spark, cfg, model.shape), "image"
    else:
        df, image_column = read_table_input(spark, ic.input), ic.image_column
    keys = [c for c in ic.key_columns if c in df.columns]
    missing = [c for c in ic.key_columns if c not in df.columns and ic.input_type != "files"]
    if missing:
        raise PipelineError(f"input has no key column {missing[0]!r} (columns: {', '.join(df.columns)})")
    if image_column not in df.columns:
        raise PipelineError(f"input has no image column {image_column!r} (columns: {', '.join(df.columns)}); "
                            f"set infer.image_column")
    if ic.input_type == "files":
        keys = ["source_path", "id"]
    df = df.select(*dict.fromkeys(keys + [image_column]))
    if ic.input_type == "dataset":  # a published version's images were checked against its shape at ingest
        ds, split = dataset_input(cfg)
        manifest = ds.manifest()
        if tuple(manifest.shape) != tuple(model.shape):
            raise PipelineError(f"model {model.uri} expects images {'x'.join(map(str, model.shape))}, dataset "
                                f"{ds.ref} has {'x'.join(map(str, manifest.shape))}")
        return df, quarantine, manifest.count(split)
    if ic.input_type != "files":
        return df, quarantine, check_image_lengths(df, image_column, model.shape)
    df = df.persist()
    n = df.count()
    if n == 0 and (quarantine is None or quarantine.count() == 0):
        raise PipelineError(f"no image files found at {ic.input}")
    return df, quarantine, n


def model_label(model) -> str:
    """How a run name names a model: `v3`, or its URI when it is not a registered version."""
    return f"v{model.version}" if model.version else model.uri


def input_label(cfg: Config) -> str:
    """How a run name names the input: NAME/VERSION:split for a dataset, else the path or table."""
    ic = cfg.infer
    if ic.input_type != "dataset":
        return ic.input or ""
    ds, split = dataset_input(cfg)
    return f"{ds.ref}:{split}"


def infer_tags(model, output: Path) -> dict[str, str]:
    tags = {"model_uri": model.uri, "model_version": model.version or "", "output": str(output)}
    if model.run_id:
        tags["training_run_id"] = model.run_id
    return tags


def log_infer_input(cfg: Config, model) -> None:
    """What was scored, for lineage: the dataset split (as training and evaluation log theirs), or the path/table."""
    import mlflow

    ic = cfg.infer
    mlflow.log_params({"input_type": ic.input_type, "input": input_label(cfg), "model_uri": model.uri,
                       "model_version": model.version or "", "batch_size": ic.batch_size})
    if ic.input_type == "dataset":
        ds, split = dataset_input(cfg)
        tracking.log_dataset(ds, ds.manifest(), "inference", split)


def log_infer_metrics(rows: int, quarantined: int, rate: float) -> None:
    import mlflow

    mlflow.log_metrics({"rows_scored": rows, "rows_quarantined": quarantined, "images_per_second": rate})
