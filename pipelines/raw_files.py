"""Raw image files for any stage: listing a folder or a glob as candidate rows, the decode spec built from config,
and decoding the candidates on the executors (through `pipelines.images`), a bad file becoming a quarantine reason.

Ingest (folder and table sources) and inference on files both read through here, so they see the same files and
the same pixels. Candidate rows have the columns of RAW_SCHEMA; pixels stay on the executors.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from pipelines.config import Config
from pipelines.errors import PipelineError, first_line
from pipelines.images import IMAGE_EXTENSIONS, ImageSpec, Quarantined, decode, normalize_array, skip_reason
from pipelines.spark import scoped_conf

MISSING_FILE = "missing_file"

# path (string), label (string or null), source_split ('test' when the source brings its own test set, else null),
# content (the file's bytes, raw pixels for IDX, or null when the Python workers read the file at `path`
# themselves), raw_height / raw_width (set only when content is already raw grayscale pixels)
RAW_SCHEMA = T.StructType([
    T.StructField("path", T.StringType()),
    T.StructField("label", T.StringType()),
    T.StructField("source_split", T.StringType()),
    T.StructField("content", T.BinaryType()),
    T.StructField("raw_height", T.IntegerType()),
    T.StructField("raw_width", T.IntegerType()),
])

DECODED_SCHEMA = T.StructType([
    T.StructField("path", T.StringType()),
    T.StructField("label", T.StringType()),
    T.StructField("source_split", T.StringType()),
    T.StructField("content_hash", T.StringType()),
    T.StructField("image", T.BinaryType()),
    T.StructField("reason", T.StringType()),
    T.StructField("detail", T.StringType()),
    T.StructField("pixel_sum", T.ArrayType(T.DoubleType())),     # per channel, pixels scaled to [0, 1]
    T.StructField("pixel_sumsq", T.ArrayType(T.DoubleType())),
])


# ------------------------------------------------------------------------------------------------ config

# Every task that reads raw files pays a fixed cost (a Python worker's set-up and clean-up, an output file committed,
# one more file for every later scan of what it wrote): at most about this many tasks per slot when the file count is
# not known, and otherwise tasks of about FILES_PER_TASK files (fewer per task only to give every slot one).
TASKS_PER_SLOT = 4
FILES_PER_TASK = 5_000


def image_spec(cfg: Config, shape: tuple[int, int, int] | None = None) -> ImageSpec:
    """The canonical pixel format from ingest.image (or `shape`, a model's input, with ingest's resize policy)."""
    im = cfg.ingest.image
    height, width, channels = shape or (im.height, im.width, im.channels)
    return ImageSpec(height, width, channels, im.resize_policy, tuple(im.background), cfg.ingest.max_pixels)


def file_read_settings(cfg: Config, slots: int) -> dict[str, str]:
    """Session settings while reading raw image files (restored when the job ends); `slots`: the session's task
    slots (defaultParallelism)."""
    return {
        # Photos are large: small Arrow batches, so a batch of raw files fits in a Python worker's memory.
        "spark.sql.execution.arrow.maxRecordsPerBatch": str(min(cfg.spark.arrow_batch_size, 64)),
        # Spark plans file splits as if each file cost 4 MB to open: for small photos that is one task per
        # ~30 files. Count 64 KB, so tasks hold hundreds of photos each.
        "spark.sql.files.openCostInBytes": str(64 * 1024),
        "spark.sql.files.maxPartitionNum": str(TASKS_PER_SLOT * slots),
    }


def decode_tasks(files: int | None, slots: int) -> int:
    """How many tasks decode `files` files (None: not known) that the Python workers read themselves: a multiple of
    the slots, so every round of tasks keeps every slot busy, as few as hold about FILES_PER_TASK files each (one
    per slot for a small folder; more rounds only as the files grow, so a long job still shows its progress task by
    task), TASKS_PER_SLOT per slot when the count is not known."""
    rounds = TASKS_PER_SLOT if files is None else -(-files // (slots * FILES_PER_TASK))
    return slots * max(1, rounds)


def spread_for_decoding(rows: DataFrame, files: int | None) -> DataFrame:
    """Candidates whose files the Python workers read (no `content`), hash-partitioned by path into decode_tasks
    tasks of about equal file counts. Spark packs a file listing into tasks by bytes, largest files first: tasks of
    unequal photo counts and a short last one, a slot left idle while the longest finishes; a table of paths may be a
    single task. Only paths move in the shuffle."""
    return rows.repartition(decode_tasks(files, rows.sparkSession.sparkContext.defaultParallelism), "path")


def path_candidates(listed: DataFrame, files: int | None) -> DataFrame:
    """Rows of `path` and `label` (string columns) as candidate rows whose files the Python workers read themselves
    (shipping the bytes JVM -> Arrow -> Python costs more than decoding them), spread for decoding; `files`: how
    many rows, None when not known."""
    rows = listed.select(F.col("path").cast("string"), F.col("label").cast("string"),
                         F.lit(None).cast("string").alias("source_split"), F.lit(None).cast("binary").alias("content"),
                         F.lit(None).cast("int").alias("raw_height"), F.lit(None).cast("int").alias("raw_width"))
    return spread_for_decoding(rows, files)


# ----------------------------------------------------------------------------------------------- listing

def qualified_path(spark: SparkSession, path: str) -> str:
    """The path as Hadoop writes it in binaryFile's `path` column (e.g. file:/data/x)."""
    hpath = spark._jvm.org.apache.hadoop.fs.Path(path)
    fs = hpath.getFileSystem(spark._jsc.hadoopConfiguration())
    return fs.makeQualified(hpath).toString().rstrip("/")


@dataclass
class LocalWalk:
    """A local root walked once: its image files with their labels, and what ingest skips."""
    paths: list[str]           # image files as file: URLs (as Spark writes them), empty ones included
    labels: list[str | None]   # each file's first folder under the root, None for a file directly in it
    hidden: int                # under a name Spark never lists (leading '.' or '_')
    not_images: int            # other extensions, which ingest skips


def walk_local(root: str) -> LocalWalk | None:
    """Every file under a local root (symlinked folders followed, as Spark's listing does), sorted into image files
    and the hidden and non-image files that are counted so nothing is lost silently; None for a root that is not a
    local folder."""
    local = root[len("file:"):] if root.startswith("file:") else root
    if "://" in local or not os.path.isdir(local):
        return None
    top = os.path.abspath(local)
    found, visited = LocalWalk([], [], 0, 0), set()
    for dirpath, dirnames, filenames in os.walk(top, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in visited:  # a link back to a folder already walked
            dirnames[:] = []
            continue
        visited.add(real)
        rel = os.path.relpath(dirpath, top)
        parts = () if rel == "." else Path(rel).parts
        in_hidden_dir = any(p.startswith((".", "_")) for p in parts)
        for f in filenames:
            reason = "hidden" if in_hidden_dir else skip_reason(f)
            if reason == "hidden":
                found.hidden += 1
            elif reason == "not_image_extension":
                found.not_images += 1
            else:
                found.paths.append(f"file:{dirpath}/{f}")
                found.labels.append(parts[0] if parts else None)
    return found


def is_image_name(path: str) -> bool:
    """Whether a file name has an image extension (the same test as is_image, in Python)."""
    return os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS


def is_image() -> F.Column:
    """Whether a listed file's name has an image extension."""
    ext = F.lower(F.regexp_extract("path", r"(\.[^./]+)$", 1))
    return ext.isin(*sorted(IMAGE_EXTENSIONS))


def local_candidates(spark: SparkSession, walk: LocalWalk) -> DataFrame:
    """A local walk's image files as candidate rows: only paths and labels go from the driver, and Spark's own
    listing does not stat every file a second time."""
    listed = pd.DataFrame({"path": pd.Series(walk.paths, dtype=object), "label": pd.Series(walk.labels, dtype=object)})
    with scoped_conf(spark, {"spark.sql.execution.arrow.pyspark.enabled": "true"}):
        files = spark.createDataFrame(listed, "path string, label string")
    return path_candidates(files, len(walk.paths))


@dataclass(frozen=True)
class FolderListing:
    """A folder's image files as candidate rows, the files listed but skipped, and how many rows (None: not known
    without a job)."""
    rows: DataFrame
    skipped: dict[str, int]
    files: int | None


def list_folder(spark: SparkSession, root: str) -> FolderListing:
    """ROOT/<label>/**/<file> as candidate rows (the label is the first folder under ROOT, null for files directly
    in ROOT), and the files listed but skipped (hidden, other extensions). A local folder is listed by walking it;
    other filesystems (s3a, hdfs, ...) through binaryFile, whose rows carry the files' content."""
    if "://" not in root and not os.path.isdir(root):
        raise PipelineError(f"image folder not found: {root}")
    walk = walk_local(root)
    if walk is not None:
        return FolderListing(local_candidates(spark, walk),
                             {"hidden": walk.hidden, "not_image_extension": walk.not_images}, len(walk.paths))
    prefix = qualified_path(spark, root)
    listed = spark.read.format("binaryFile").option("recursiveFileLookup", "true").load(root)
    not_images = listed.select("path").where(~is_image()).count()
    parts = F.split(F.expr(f"substring(path, {len(prefix) + 2})"), "/")
    rows = listed.where(is_image()).select(
        "path", F.when(F.size(parts) > 1, parts.getItem(0)).alias("label"),
        F.lit(None).cast("string").alias("source_split"), "content",
        F.lit(None).cast("int").alias("raw_height"), F.lit(None).cast("int").alias("raw_width"))
    return FolderListing(rows, {"hidden": 0, "not_image_extension": not_images}, None)


def list_glob(spark: SparkSession, pattern: str) -> DataFrame:
    """The image files a glob matches, as candidate rows without labels."""
    try:
        files = spark.read.format("binaryFile").load(pattern)
    except Exception as exc:
        raise PipelineError(f"cannot read image files at {pattern}: {first_line(exc)}") from None
    return unlabelled_candidates(files)


def unlabelled_candidates(files: DataFrame) -> DataFrame:
    """binaryFile rows (a listing, or a stream's micro-batch) -> candidate rows of the image files, without labels."""
    return files.where(is_image()).select(
        "path", F.lit(None).cast("string").alias("label"), F.lit(None).cast("string").alias("source_split"),
        "content", F.lit(None).cast("int").alias("raw_height"), F.lit(None).cast("int").alias("raw_width"))


def list_files(spark: SparkSession, path: str) -> DataFrame:
    """A folder (recursively, labels from its sub-folders) or a glob, as candidate rows."""
    return list_folder(spark, path).rows if os.path.isdir(path) else list_glob(spark, path)


# ---------------------------------------------------------------------------------------------- decoding

def local_path(path: str) -> str:
    """A `file:` URL (file:/x, file:///x) or a plain path as a local path."""
    return "/" + path[len("file:"):].lstrip("/") if path.startswith("file:") else path


def read_local(path: str) -> bytes | None:
    """A file's bytes read by this Python worker (`file:` URLs and plain paths), or None when unreadable."""
    try:
        with open(local_path(path), "rb") as fh:
            return fh.read()
    except (OSError, TypeError):
        return None


def decode_row(content: bytes | None, raw_height, raw_width, spec: ImageSpec) -> np.ndarray:
    """One candidate's canonical pixels: raw IDX pixels are reshaped, file bytes are decoded."""
    if content is None:
        raise Quarantined(MISSING_FILE, "the file could not be read")
    if raw_height is not None and not pd.isna(raw_height):
        pixels = np.frombuffer(content, dtype=np.uint8).reshape(int(raw_height), int(raw_width))
        return normalize_array(pixels, spec)
    return decode(content, spec)


def _decoded(row, content: bytes | None, spec: ImageSpec) -> tuple:
    """One DECODED_SCHEMA row (in its column order) for one candidate."""
    digest = hashlib.sha256(content).hexdigest() if content is not None else None
    try:
        pixels = decode_row(content, row.raw_height, row.raw_width, spec)
    except Quarantined as q:
        return row.path, row.label, row.source_split, digest, None, q.reason, q.detail, None, None
    flat = pixels.reshape(-1, spec.channels)
    wide = flat.astype(np.int32)
    # exact integer sums, scaled to pixels in [0, 1] afterwards
    sums = (flat.sum(axis=0, dtype=np.int64) / 255.0).tolist()
    sumsq = (np.einsum("ij,ij->j", wide, wide, dtype=np.int64) / 65025.0).tolist()
    return row.path, row.label, row.source_split, digest, pixels.tobytes(), None, None, sums, sumsq


def decode_batches(batches: Iterator[pd.DataFrame], spec: ImageSpec) -> Iterator[pd.DataFrame]:
    """mapInPandas body: candidates -> DECODED_SCHEMA rows (image or reason, hash, channel sums)."""
    for batch in batches:
        rows = [_decoded(row, row.content if row.content is not None else read_local(row.path), spec)
                for row in batch.itertuples(index=False)]
        yield pd.DataFrame(rows, columns=DECODED_SCHEMA.names)


def decode_candidates(rows: DataFrame, spec: ImageSpec) -> DataFrame:
    """Candidates -> decoded rows, computed on the executors (pixels never reach the driver)."""
    return rows.mapInPandas(lambda it: decode_batches(it, spec), DECODED_SCHEMA)
