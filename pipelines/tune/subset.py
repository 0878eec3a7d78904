"""A class-stratified subset of a training split, so trials can train on fewer rows (`tune.max_train_rows`) while
the validation split stays whole. Written by Spark next to the study; pixels never reach the driver."""
from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

from pyspark.sql import SparkSession, Window
from pyspark.sql import functions as F

from pipelines.dataset.contract import DatasetVersion
from pipelines.train.spec import TrainingData

MARKER = "_subset.json"
ROW_BYTES_EXTRA = 200  # label, ids and paths beside the pixels, for the row-group size


def class_quotas(per_class: dict[str, int], rows: int) -> dict[str, int]:
    """Rows to keep per class: the split's class proportions scaled to `rows` (at least 1 of each present class)."""
    total = sum(per_class.values())
    return {c: max(1, math.floor(rows * n / total)) if n else 0 for c, n in per_class.items()}


def stratified_subset(spark: SparkSession, ds: DatasetVersion, data: TrainingData, rows: int, seed: int,
                      out: Path, row_group_rows: int) -> TrainingData:
    """`data` with its training split replaced by a seeded class-stratified sample of `rows` rows under `out`
    (reused when a previous call made the same one)."""
    if rows <= 0 or rows >= data.train_rows:
        return data
    key = {"dataset": ds.ref, "rows": rows, "seed": seed}
    marker = out / MARKER
    if marker.is_file() and json.loads(marker.read_text()).get("key") == key:
        return dataclasses.replace(data, train_url=out.as_uri(), train_rows=json.loads(marker.read_text())["rows"])
    per_class = ds.manifest().data["counts"]["per_class"]["train"]
    quota = class_quotas(per_class, rows)
    rank = F.row_number().over(Window.partitionBy("label_name").orderBy(F.rand(seed)))
    quotas = F.create_map(*[x for c, q in quota.items() for x in (F.lit(c), F.lit(q))])
    sample = (spark.read.parquet(ds.split_path("train").as_uri()).withColumn("_rank", rank)
              .where(F.col("_rank") <= quotas.getItem(F.col("label_name"))).drop("_rank"))
    staging = out.with_name(out.name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    (sample.repartition(1).sortWithinPartitions("id").write
     .option("parquet.block.size", str(row_group_rows * (math.prod(data.shape) + ROW_BYTES_EXTRA)))
     .parquet(staging.as_uri()))
    written = sum(quota.values())
    (staging / MARKER).write_text(json.dumps({"key": key, "rows": written}))
    staging.rename(out)
    return dataclasses.replace(data, train_url=out.as_uri(), train_rows=written)
