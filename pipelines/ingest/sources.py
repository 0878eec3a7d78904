"""Sources: each returns a DataFrame of candidate images, one row per image file (or IDX record), with the columns
of `pipelines.raw_files.RAW_SCHEMA`. Folder listing is the shared raw-file reader's; pixels stay on the executors.
"""
from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pandas as pd
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from pipelines.errors import PipelineError
from pipelines.raw_files import RAW_SCHEMA, list_folder, path_candidates, qualified_path


@dataclass(frozen=True)
class Candidates:
    """What a source found: the candidate rows plus files listed but skipped (hidden, other extensions)."""

    rows: DataFrame
    skipped: dict[str, int]
    description: dict[str, object]
    own_test: bool = False  # the source lists its own test set (rows with source_split 'test')
    count: int | None = None  # how many rows, when the source knows without a job (decoding keeps one row each)


# ------------------------------------------------------------------------------------------------ IDX

IDX_IMAGES_MAGIC = 0x00000803
IDX_LABELS_MAGIC = 0x00000801
IDX_PAIRS = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


@dataclass(frozen=True)
class IdxFile:
    path: str
    count: int
    dims: tuple[int, ...]
    header_bytes: int


def _open_idx(path: str):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def _uncompressed_size(path: str) -> int:
    """Payload size without decompressing: gzip's ISIZE trailer (mod 2^32, fine for IDX files)."""
    if not path.endswith(".gz"):
        return os.path.getsize(path)
    with open(path, "rb") as fh:
        fh.seek(-4, os.SEEK_END)
        return struct.unpack("<I", fh.read(4))[0]


def read_idx_header(path: str, magic: int) -> IdxFile:
    """Validate an IDX file's header against its size; raise a clear error for wrong or truncated files."""
    try:
        with _open_idx(path) as fh:
            head = fh.read(4)
            if len(head) < 4:
                raise PipelineError(f"{path}: too short to be an IDX file")
            found = struct.unpack(">I", head)[0]
            if found != magic:
                raise PipelineError(f"{path}: wrong IDX magic number 0x{found:08x} (expected 0x{magic:08x})")
            ndim = magic & 0xFF
            dims = struct.unpack(f">{ndim}I", fh.read(4 * ndim))
    except (OSError, EOFError, struct.error) as exc:
        raise PipelineError(f"{path}: unreadable IDX file ({exc})") from None
    header = 4 + 4 * ndim
    expected = header + int(pd.Series(dims).prod())
    actual = _uncompressed_size(path)
    if actual < expected:
        raise PipelineError(f"{path}: truncated IDX file: {actual} bytes, header promises {expected}")
    return IdxFile(path, dims[0], tuple(dims[1:]), header)


def _find(folder: Path, stem: str) -> str:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return str(folder / name)
    raise PipelineError(f"IDX source {folder}: missing {stem}[.gz]")


_IDX_CACHE: dict[str, bytes] = {}


def _idx_payload(path: str) -> bytes:
    """The whole decompressed IDX file, once per Python worker."""
    if path not in _IDX_CACHE:
        _IDX_CACHE.clear()
        with _open_idx(path) as fh:
            _IDX_CACHE[path] = fh.read()
    return _IDX_CACHE[path]


def idx_source(spark: SparkSession, folder: str, label_names: list[str] | None, partitions: int) -> Candidates:
    """MNIST-format IDX files: train-* (and t10k-* as the source's own test set)."""
    root = Path(folder)
    if not root.is_dir():
        raise PipelineError(f"IDX source folder not found: {folder}")
    frames, own_test, count = [], 0, 0
    description: dict[str, object] = {"type": "idx", "path": str(root.resolve()), "files": {}}
    for split, (img_stem, lbl_stem) in IDX_PAIRS.items():
        if split == "test" and not any((root / (img_stem + s)).exists() for s in ("", ".gz")):
            continue
        images = read_idx_header(_find(root, img_stem), IDX_IMAGES_MAGIC)
        labels = read_idx_header(_find(root, lbl_stem), IDX_LABELS_MAGIC)
        if images.count != labels.count:
            raise PipelineError(f"{images.path} has {images.count} images but {labels.path} has {labels.count} labels")
        if len(images.dims) != 2:
            raise PipelineError(f"{images.path}: expected 2-D images, found dims {images.dims}")
        description["files"][split] = [images.path, labels.path]  # type: ignore[index]
        own_test += images.count if split == "test" else 0
        count += images.count
        frames.append(_idx_rows(spark, images, labels, "test" if split == "test" else None, label_names, partitions))
    rows = frames[0] if len(frames) == 1 else frames[0].unionByName(frames[1])
    return Candidates(rows, {}, description, own_test=own_test > 0, count=count)


def _idx_rows(spark: SparkSession, images: IdxFile, labels: IdxFile, source_split: str | None,
              label_names: list[str] | None, partitions: int) -> DataFrame:
    height, width = images.dims
    size = height * width
    img_name = os.path.basename(images.path)
    names = list(label_names or [])

    def read_slices(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        for batch in batches:
            idx = batch["id"].to_numpy()
            pix = _idx_payload(images.path)
            lab = _idx_payload(labels.path)
            contents = [pix[images.header_bytes + i * size: images.header_bytes + (i + 1) * size] for i in idx]
            ids = [lab[labels.header_bytes + i] for i in idx]
            yield pd.DataFrame({
                "path": [f"{img_name}#{i}" for i in idx],
                "label": [names[k] if k < len(names) else str(k) for k in ids],
                "source_split": source_split,
                "content": contents,
                "raw_height": height,
                "raw_width": width,
            })

    return spark.range(0, images.count, numPartitions=partitions).mapInPandas(read_slices, RAW_SCHEMA)


# --------------------------------------------------------------------------------------------- folder

def folder_source(spark: SparkSession, root: str) -> Candidates:
    """ROOT/<label>/**/<file>: the label is the first folder under ROOT (see raw_files.list_folder)."""
    listing = list_folder(spark, root)
    return Candidates(listing.rows, listing.skipped, {"type": "folder", "path": qualified_path(spark, root)},
                      count=listing.files)


# ---------------------------------------------------------------------------------------------- table

def table_source(spark: SparkSession, path: str, path_column: str, label_column: str) -> Candidates:
    """A Parquet table or CSV manifest listing image file paths and labels; files are read on executors."""
    if path.lower().endswith(".csv"):
        table = spark.read.option("header", "true").csv(path)
    else:
        table = spark.read.parquet(path)
    missing = [c for c in (path_column, label_column) if c not in table.columns]
    if missing:
        raise PipelineError(f"table {path} has no column {missing[0]!r} (columns: {', '.join(table.columns)})")

    listed = table.select(F.col(path_column).alias("path"), F.col(label_column).alias("label"))
    return Candidates(path_candidates(listed, None), {}, {"type": "table", "path": path})
