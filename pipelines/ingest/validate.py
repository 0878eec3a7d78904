"""Decode and normalize every candidate on the executors; a bad file becomes a quarantine reason, never an error."""
from __future__ import annotations

import hashlib
from typing import Iterator

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame
from pyspark.sql import types as T

from pipelines.images import ImageSpec, Quarantined, decode, normalize_array

MISSING_FILE = "missing_file"

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


def read_local(path: str) -> bytes | None:
    """A file's bytes read by this Python worker (`file:` URLs and plain paths), or None when unreadable."""
    local = path[len("file:"):] if path.startswith("file:") else path
    local = "/" + local.lstrip("/") if path.startswith("file:") else local
    try:
        with open(local, "rb") as fh:
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


def decode_batches(batches: Iterator[pd.DataFrame], spec: ImageSpec) -> Iterator[pd.DataFrame]:
    """mapInPandas body: candidates -> DECODED_SCHEMA rows (image or reason, hash, channel sums)."""
    for batch in batches:
        out = {name: [] for name in DECODED_SCHEMA.names}
        for row in batch.itertuples(index=False):
            content = row.content if row.content is not None else read_local(row.path)
            out["path"].append(row.path)
            out["label"].append(row.label)
            out["source_split"].append(row.source_split)
            out["content_hash"].append(hashlib.sha256(content).hexdigest() if content is not None else None)
            try:
                pixels = decode_row(content, row.raw_height, row.raw_width, spec)
            except Quarantined as q:
                out["image"].append(None)
                out["reason"].append(q.reason)
                out["detail"].append(q.detail)
                out["pixel_sum"].append(None)
                out["pixel_sumsq"].append(None)
                continue
            flat = pixels.reshape(-1, spec.channels)
            out["image"].append(pixels.tobytes())
            out["reason"].append(None)
            out["detail"].append(None)
            # exact integer sums, scaled to pixels in [0, 1] afterwards
            out["pixel_sum"].append((flat.sum(axis=0, dtype=np.int64) / 255.0).tolist())
            wide = flat.astype(np.int32)
            out["pixel_sumsq"].append((np.einsum("ij,ij->j", wide, wide, dtype=np.int64) / 65025.0).tolist())
        yield pd.DataFrame(out)


def decode_candidates(rows: DataFrame, spec: ImageSpec) -> DataFrame:
    """Candidates -> decoded rows, computed on the executors (pixels never reach the driver)."""
    return rows.mapInPandas(lambda it: decode_batches(it, spec), DECODED_SCHEMA)
