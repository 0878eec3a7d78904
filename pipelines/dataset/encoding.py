"""How a dataset version stores its images (`ingest.storage`): `pixels`, raw uint8 bytes of the canonical shape, or
`encoded`, each image already at that shape and encoded as JPEG or PNG, a fraction of the bytes for large photos.

Encoded images are decoded by one decoder, TensorFlow's, wherever pixels are read: in the training feed (inside
tf.data, in parallel), in evaluation and in batch inference, so every consumer sees the same pixels. PNG gives back
the ingested pixels exactly; JPEG gives what its decoder makes of them.
"""
from __future__ import annotations

import io
from typing import Iterator

import numpy as np
import pandas as pd
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

# For sizing row groups before anything is encoded: roughly what an encoded image takes against its raw pixels
ENCODED_SIZE_FRACTION = {"jpeg": 0.125, "png": 0.5}


def encode_pixels(pixels: bytes, shape: tuple[int, int, int], fmt: str, quality: int) -> bytes:
    """Raw uint8 pixels of `shape` -> one JPEG or PNG file's bytes."""
    from PIL import Image

    channels = shape[2]
    array = np.frombuffer(pixels, np.uint8).reshape(shape)
    image = Image.fromarray(array[:, :, 0] if channels == 1 else array, "L" if channels == 1 else "RGB")
    out = io.BytesIO()
    if fmt == "jpeg":
        image.save(out, "JPEG", quality=quality)
    else:
        image.save(out, "PNG", compress_level=6)
    return out.getvalue()


def encoded_column(column: str, shape: tuple[int, int, int], fmt: str, quality: int) -> Column:
    """A pixel-bytes column encoded on the executors."""

    @F.pandas_udf("binary")
    def encode(batches: Iterator[pd.Series]) -> Iterator[pd.Series]:
        for images in batches:
            yield images.map(lambda b: encode_pixels(b, shape, fmt, quality))

    return encode(F.col(column))


def decode_one(image, shape: tuple[int, int, int]):
    """One encoded image (a scalar string tensor) -> uint8 tensor of `shape`, in the graph."""
    import tensorflow as tf

    pixels = tf.io.decode_image(image, channels=shape[2], expand_animations=False)
    return tf.ensure_shape(pixels, shape)


def decode_batch(images, shape: tuple[int, int, int]):
    """A batch of encoded images (a string tensor) -> (n, *shape) uint8, in the graph."""
    import tensorflow as tf

    return tf.map_fn(lambda b: decode_one(b, shape), images, fn_output_signature=tf.TensorSpec(shape, tf.uint8))


def decoded_column(column: str, shape: tuple[int, int, int]) -> Column:
    """An encoded-image column decoded on the executors to raw pixel bytes (what the model's input takes)."""

    @F.pandas_udf("binary")
    def decode(batches: Iterator[pd.Series]) -> Iterator[pd.Series]:
        import tensorflow as tf

        for images in batches:
            if len(images) == 0:
                yield images
                continue
            pixels = decode_batch(tf.constant(images.to_numpy(dtype=object).astype(bytes)), shape).numpy()
            yield pd.Series([p.tobytes() for p in pixels])

    return decode(F.col(column))


def with_pixels(df: DataFrame, manifest) -> DataFrame:
    """A dataset split's rows with raw pixel bytes in `image`, whatever the version stores (decoded on the
    executors)."""
    return df.withColumn("image", decoded_column("image", manifest.shape)) if manifest.encoded else df
