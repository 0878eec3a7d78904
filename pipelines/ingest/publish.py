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
from typing import Any

from pyspark.sql import DataFrame

from pipelines.dataset.contract import MANIFEST, dataset_root, next_version, set_latest

STALE_STAGING_SECONDS = 6 * 3600


class Staging:
    """`<root>/<name>/_staging-<uuid>/`: invisible to readers (leading underscore) until published."""

    def __init__(self, datasets_root: str, name: str):
        self.datasets_root = datasets_root
        self.name = name
        self.root = dataset_root(datasets_root, name)
        self.root.mkdir(parents=True, exist_ok=True)
        self._remove_stale()
        self.path = self.root / f"_staging-{uuid.uuid4().hex[:12]}"
        self.path.mkdir()

    def _remove_stale(self) -> None:
        """Staging folders of killed runs, once old enough that no live run can own them."""
        for p in self.root.glob("_staging-*"):
            if time.time() - p.stat().st_mtime > STALE_STAGING_SECONDS:
                shutil.rmtree(p, ignore_errors=True)

    def url(self, part: str) -> str:
        return (self.path / part).as_uri()

    def write(self, df: DataFrame, part: str, files: int, row_group_bytes: int | None = None,
              sort_by: str | None = None) -> None:
        df = df.repartition(files)
        writer = (df.sortWithinPartitions(sort_by) if sort_by else df).write.mode("error")
        if row_group_bytes:
            writer = writer.option("parquet.block.size", str(row_group_bytes))
        writer.parquet(self.url(part))

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        (self.path / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n")

    def publish(self) -> str:
        """Rename the staging folder to the next version and point LATEST at it; return the version."""
        for _ in range(5):
            version = next_version(self.datasets_root, self.name)
            try:
                os.rename(self.path, self.root / version)  # atomic on one filesystem
            except OSError:
                continue  # another run took that number first
            set_latest(self.datasets_root, self.name, version)
            return version
        raise RuntimeError(f"could not publish {self.path}")

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def parquet_row_groups(path: Path) -> list[int]:
    """Row counts of every row group under a Parquet folder (footers only)."""
    import pyarrow.parquet as pq

    out = []
    for f in sorted(path.glob("*.parquet")):
        meta = pq.ParquetFile(f).metadata
        out += [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
    return out
