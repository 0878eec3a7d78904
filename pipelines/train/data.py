"""petastorm -> tf.data for one Horovod worker's shard of a dataset split."""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Iterator

import tensorflow as tf


@dataclass(frozen=True)
class FeedOptions:
    shape: tuple[int, int, int]
    batch_size: int
    shard: int
    shard_count: int
    seed: int = 0
    shuffle_buffer: int = 2048
    augment: bool = False
    class_weights: tuple[float, ...] = ()
    reader_threads: int = 2


def _decode(image: tf.Tensor, label: tf.Tensor, shape) -> tuple[tf.Tensor, tf.Tensor]:
    """A row group's raw pixel bytes -> (n, H, W, C) uint8 and int32 labels, in the graph."""
    pixels = tf.reshape(tf.io.decode_raw(image, tf.uint8), (-1, *shape))
    return pixels, tf.cast(label, tf.int32)


def _augment(x: tf.Tensor, shape) -> tf.Tensor:
    """Random shift by up to 2 pixels and random horizontal flip, on uint8 batches."""
    h, w, _ = shape
    padded = tf.pad(x, [[0, 0], [2, 2], [2, 2], [0, 0]], mode="REFLECT")
    n = tf.shape(x)[0]
    dy = tf.random.uniform([], 0, 5, dtype=tf.int32)
    dx = tf.random.uniform([], 0, 5, dtype=tf.int32)
    shifted = tf.slice(padded, [0, dy, dx, 0], [n, h, w, shape[2]])
    flip = tf.random.uniform([n, 1, 1, 1]) < 0.5
    return tf.where(flip, tf.reverse(shifted, axis=[2]), shifted)


@contextlib.contextmanager
def split_dataset(url: str, opts: FeedOptions, *, endless: bool) -> Iterator[tf.data.Dataset]:
    """Batches (pixels, labels, sample_weights) from this worker's shard.

    endless=True (training): row groups are reshuffled and repeated forever; the caller takes exactly the
    steps it needs, so every worker runs the same number of steps whatever its shard size.
    endless=False (validation): one pass over the shard, every row once, no shuffling.
    """
    from petastorm import make_batch_reader
    from petastorm.tf_utils import make_petastorm_dataset

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reader = make_batch_reader(
            url, schema_fields=["image", "label"], cur_shard=opts.shard, shard_count=opts.shard_count,
            num_epochs=None if endless else 1, shuffle_row_groups=endless, seed=opts.seed,
            workers_count=opts.reader_threads, reader_pool_type="thread")
    try:
        ds = make_petastorm_dataset(reader)
        ds = ds.map(lambda b: _decode(b.image, b.label, opts.shape), num_parallel_calls=tf.data.AUTOTUNE)
        ds = ds.unbatch()
        if endless:
            ds = ds.shuffle(opts.shuffle_buffer, seed=opts.seed, reshuffle_each_iteration=True)
        ds = ds.batch(opts.batch_size, drop_remainder=endless)
        if endless and opts.augment:
            ds = ds.map(lambda x, y: (_augment(x, opts.shape), y), num_parallel_calls=tf.data.AUTOTUNE)
        weights = tf.constant(opts.class_weights or [1.0], tf.float32)
        if opts.class_weights:
            ds = ds.map(lambda x, y: (x, y, tf.gather(weights, y)))
        else:
            ds = ds.map(lambda x, y: (x, y, tf.ones_like(y, tf.float32)))
        yield ds.prefetch(tf.data.AUTOTUNE)
    finally:
        reader.stop()
        reader.join()
