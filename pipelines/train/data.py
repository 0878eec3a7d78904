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
    cache: bool = False  # training only: decode the shard once, then serve every epoch from memory
    max_rows: int = 0  # an upper bound on the shard's rows (the split's count): the full-shuffle buffer size


def _race_free_thread_pool(workers: int, seed: int):
    """petastorm's ThreadPool, with the end-of-data check of a finite read made race-free.

    petastorm 0.13.1's get_results() asks all_workers_done() first and ventilator.completed() second. When the
    ventilator thread sends its last row groups between the two questions, a one-pass read ends early (6 short
    reads in 360 on a 2-core machine, most of them with 0 rows). Asking completed() first closes the gap: once it is True, every row
    group it sent is already counted in the per-worker totals that all_workers_done() compares.
    """
    from petastorm.workers_pool.thread_pool import ThreadPool

    class RaceFreeThreadPool(ThreadPool):
        def all_workers_done(self) -> bool:
            ventilation_over = self._ventilator is None or self._ventilator.completed()
            return ventilation_over and super().all_workers_done()

    return RaceFreeThreadPool(workers, results_queue_size=50, shuffle_rows=False, seed=seed)


def open_batch_reader(url: str, *, columns: list[str], num_epochs: int | None = 1, shuffle_row_groups: bool = False,
                      shard: int | None = None, shard_count: int | None = None, seed: int = 0, workers: int = 2):
    """petastorm.make_batch_reader (one row group per batch, threads) on the race-free pool above."""
    from petastorm.arrow_reader_worker import ArrowReaderWorker
    from petastorm.cache import NullCache
    from petastorm.fs_utils import get_filesystem_and_path_or_paths
    from petastorm.reader import Reader

    filesystem, path = get_filesystem_and_path_or_paths(url)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # petastorm's pyarrow deprecation and schema_fields warnings
        return Reader(filesystem, path, schema_fields=columns, worker_class=ArrowReaderWorker,
                      reader_pool=_race_free_thread_pool(workers, seed), seed=seed, shuffle_rows=False,
                      shuffle_row_groups=shuffle_row_groups, num_epochs=num_epochs, cur_shard=shard,
                      shard_count=shard_count, cache=NullCache(), is_batched_reader=True)


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

    endless=True (training): repeated forever; the caller takes exactly the steps it needs, so every worker runs
    the same number of steps whatever its shard size. Streamed (opts.cache False): row groups are reshuffled
    every pass and rows mixed in a shuffle buffer. Cached: petastorm reads the shard once, tf.data keeps the
    decoded rows in memory, and every pass over them is a full, seeded shuffle of the shard.
    endless=False (validation): one pass over the shard, every row once, no shuffling.
    """
    from petastorm.tf_utils import make_petastorm_dataset

    cached = endless and opts.cache
    reader = open_batch_reader(url, columns=["image", "label"], num_epochs=None if endless and not cached else 1,
                               shuffle_row_groups=endless, shard=opts.shard, shard_count=opts.shard_count,
                               seed=opts.seed, workers=opts.reader_threads)
    try:
        ds = make_petastorm_dataset(reader)
        ds = ds.map(lambda b: _decode(b.image, b.label, opts.shape), num_parallel_calls=tf.data.AUTOTUNE)
        ds = ds.unbatch()
        if cached:
            ds = ds.cache().shuffle(max(opts.max_rows, 1), seed=opts.seed, reshuffle_each_iteration=True).repeat()
        elif endless:
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
