"""Atomic publish: write under a hidden staging folder, verify, then rename into place and move LATEST.

A failed or killed run leaves no visible partial version and the previous version untouched.
"""
from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import IO, Any

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import StructType

from pipelines.dataset.contract import MANIFEST, dataset_root, latest_version, next_version, read_manifest, set_latest
from pipelines.spark import partition_keys

PARTS = "_parts"  # inside the staging folder: write_parts' output before its folders move into place
STALE_STAGING_SECONDS = 6 * 3600  # a staging folder without a lock file (written before there were locks)


class Staging:
    """`<root>/<name>/_staging-<uuid>/`: invisible to readers (leading underscore) until published. Its run holds an
    exclusive lock on `.staging-<uuid>.lock` beside it while it lives, so the next run knows a folder whose lock
    it can take belongs to a run that was killed, and removes it."""

    def __init__(self, datasets_root: str, name: str):
        self.datasets_root = datasets_root
        self.name = name
        self.root = dataset_root(datasets_root, name)
        self.root.mkdir(parents=True, exist_ok=True)
        self.removed_stale = self._remove_stale()
        token = uuid.uuid4().hex[:12]
        self._lock = _locked(_lock_file(self.root, token), wait=False)  # before the folder exists
        self.path = self.root / f"_staging-{token}"
        self.path.mkdir()
        self.schemas: dict[str, StructType] = {}  # part -> the schema written there

    def _remove_stale(self) -> int:
        """Remove the staging folders of killed runs (their lock is free); how many there were."""
        removed = 0
        for p in self.root.glob("_staging-*"):
            lock = _lock_file(self.root, p.name.removeprefix("_staging-"))
            if lock.exists():
                try:
                    held = _locked(lock, wait=False)
                except BlockingIOError:
                    continue  # a live run is writing it
                shutil.rmtree(p, ignore_errors=True)
                lock.unlink(missing_ok=True)
                held.close()
                removed += 1
            elif time.time() - p.stat().st_mtime > STALE_STAGING_SECONDS:
                shutil.rmtree(p, ignore_errors=True)
                removed += 1
        return removed

    def url(self, part: str) -> str:
        return (self.path / part).as_uri()

    def write(self, df: DataFrame, part: str, files: int) -> None:
        """`df` into `files` Parquet files under `part`."""
        df = df.repartition(files)
        df.write.mode("error").parquet(self.url(part))
        self.schemas[part] = df.schema

    def write_empty(self, part: str, schema: StructType) -> None:
        """An empty `part`: one Parquet file of `schema` and no rows, written here without a Spark job."""
        import pyarrow as pa
        import pyarrow.parquet as pq
        from pyspark.sql.pandas.types import to_arrow_schema

        (self.path / part).mkdir()
        pq.write_table(pa.Table.from_pylist([], to_arrow_schema(schema)), self.path / part / "part-00000-empty.parquet")
        self.schemas[part] = schema

    def write_parts(self, df: DataFrame, column: str, parts: tuple[str, ...], files: int, row_group_bytes: int,
                    sort_by: str) -> None:
        """One part per value of `column` (its rows without that column), written by one job that reads `df` once;
        each part's rows go into `files` files by a hash of `sort_by` (fewer only for a part of fewer rows), sorted by
        it within each file. A part with no rows still gets its folder and a file holding the schema."""
        # every (part, bucket) in a task of its own, so each part gets `files` files of about equal row counts
        slots = len(parts) * files
        index = F.create_map(*[x for i, p in enumerate(parts) for x in (F.lit(p), F.lit(i))])
        part = F.element_at(index, F.col(column))
        slot = (part * files + F.pmod(F.xxhash64(sort_by), F.lit(files))).cast("int")
        keys = F.create_map(*[x for i, k in enumerate(partition_keys(slots)) for x in (F.lit(i), F.lit(k))])
        spread = df.repartition(slots, F.element_at(keys, slot)).sortWithinPartitions(column, sort_by)
        # parquet-mr measures a row group's size only every 100 rows at first, and a dictionary-encoded column's size
        # not until the dictionary gives up: large photos need row groups of fewer rows to shard
        (spread.write.mode("error").partitionBy(column)
         .option("parquet.block.size", str(row_group_bytes))
         .option("parquet.page.size.row.check.min", "1")
         .option("parquet.enable.dictionary#image", "false")
         .parquet(self.url(PARTS)))
        for part in parts:
            written = self.path / PARTS / f"{column}={part}"
            if written.is_dir():
                os.rename(written, self.path / part)
                self.schemas[part] = df.drop(column).schema
            else:
                self.write(df.where(F.lit(False)).drop(column), part, 1)
        shutil.rmtree(self.path / PARTS)

    def read(self, spark: SparkSession, part: str) -> DataFrame:
        """A part written by `write`, read back with the schema it was written with (Spark need not run a job to
        read a footer for it)."""
        return spark.read.schema(self.schemas[part]).parquet(self.url(part))

    def publish_unless_same(self, manifest: dict[str, Any]) -> tuple[str, bool]:
        """Publish as the next version and point LATEST at it, unless the latest version already holds the same
        content (then discard): (version, unchanged). Under the dataset's publish lock, so two ingests at once
        publish one after the other, the second seeing the first's version."""
        with _locked(self.root / ".publish.lock", wait=True):
            previous = latest_version(self.datasets_root, self.name)
            if previous and read_manifest(self.root / previous).digest == manifest["content_digest"]:
                self.discard()
                return previous, True
            (self.path / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n")
            version = next_version(self.datasets_root, self.name)
            os.rename(self.path, self.root / version)  # atomic on one filesystem
            set_latest(self.datasets_root, self.name, version)
        self._release()
        return version, False

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        self._release()

    def _release(self) -> None:
        if not self._lock.closed:
            _lock_file(self.root, self.path.name.removeprefix("_staging-")).unlink(missing_ok=True)
            self._lock.close()


def _lock_file(root: Path, token: str) -> Path:
    """The lock file beside staging folder `_staging-<token>` (outside it, so it is not published with it)."""
    return root / f".staging-{token}.lock"


def _locked(path: Path, wait: bool) -> IO[str]:
    """`path` opened and exclusively locked (flock: the OS drops it when the process dies); closing unlocks. Without
    `wait`, BlockingIOError when another process holds it."""
    import fcntl

    fh = open(path, "a+")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BaseException:
        fh.close()
        raise
    return fh


def parquet_rows(path: Path) -> int:
    """Rows in a Parquet folder, from its files' footers."""
    return sum(parquet_row_groups(path))


def parquet_row_groups(path: Path) -> list[int]:
    """Row counts of every row group under a Parquet folder (footers only)."""
    import pyarrow.parquet as pq

    out = []
    for f in sorted(path.glob("*.parquet")):
        meta = pq.ParquetFile(f).metadata
        out += [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
    return out
