"""petastorm -> tf.data for one Horovod worker's shard of a dataset split."""
from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import tensorflow as tf

from pipelines.config import AugmentConfig
from pipelines.dataset.encoding import decode_batch
from pipelines.errors import first_line


@dataclass(frozen=True)
class FeedOptions:
    shape: tuple[int, int, int]
    batch_size: int
    shard: int
    shard_count: int
    seed: int = 0
    shuffle_buffer: int = 2048
    augment: AugmentConfig | None = None  # None: no augmentation (validation, or train.augment off)
    class_weights: tuple[float, ...] = ()
    reader_threads: int = 2
    cache: bool = False  # read the shard once, then serve every epoch from memory
    encoded: bool = False  # images stored as JPEG/PNG files (ingest.storage encoded): decoded here


def cache_shard(rows: int, workers: int, shape: tuple[int, int, int], cache_mb: int) -> bool:
    """Whether a worker's share of `rows` (training plus validation; raw uint8 pixels) fits the in-memory cache
    budget."""
    shard_bytes = math.ceil(rows / workers) * math.prod(shape)
    return cache_mb > 0 and shard_bytes <= cache_mb * 2**20


def _race_free_thread_pool(workers: int, seed: int):
    """petastorm's ThreadPool, with the end-of-data check of a finite read made race-free.

    petastorm 0.13.1's get_results() asks all_workers_done() first and ventilator.completed() second. When the
    ventilator thread sends its last row groups between the two questions, a one-pass read ends early, often with
    nothing read. Asking completed() first closes the gap: once it is True, every row
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
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # petastorm's pyarrow deprecation and schema_fields warnings
            return Reader(filesystem, path, schema_fields=columns, worker_class=ArrowReaderWorker,
                          reader_pool=_race_free_thread_pool(workers, seed), seed=seed, shuffle_rows=False,
                          shuffle_row_groups=shuffle_row_groups, num_epochs=num_epochs, cur_shard=shard,
                          shard_count=shard_count, cache=NullCache(), is_batched_reader=True)
    except Exception as exc:
        damaged = unreadable_parquet_file(url)
        if damaged:  # petastorm reports a damaged file as a missing `_common_metadata`; name the file instead
            raise RuntimeError(f"{damaged[0]} is not a readable Parquet file ({damaged[1]}): the dataset version is "
                               "damaged; ingest it again") from exc
        raise


def local_path(url: str) -> Path | None:
    """The local path of a `file:` URL (or a plain path); None for other filesystems (hdfs:, s3:, ...)."""
    from urllib.parse import unquote, urlparse

    parsed = urlparse(url)
    return Path(unquote(parsed.path)) if parsed.scheme in ("", "file") else None


def unreadable_parquet_file(url: str) -> tuple[str, str] | None:
    """The first Parquet file of a local split whose footer cannot be read, and why; None when all can be."""
    import pyarrow.parquet as pq

    split = local_path(url)
    for file in sorted(split.glob("*.parquet")) if split else []:
        try:
            pq.read_metadata(file)
        except Exception as exc:
            return str(file), first_line(exc) or type(exc).__name__
    return None


def _decode(image: tf.Tensor, label: tf.Tensor, shape, encoded: bool) -> tuple[tf.Tensor, tf.Tensor]:
    """A row group's images (raw pixel bytes, or JPEG/PNG files) -> (n, H, W, C) uint8 and int32 labels, in the
    graph."""
    if encoded:
        return decode_batch(image, shape), tf.cast(label, tf.int32)
    pixels = tf.reshape(tf.io.decode_raw(image, tf.uint8), (-1, *shape))
    return pixels, tf.cast(label, tf.int32)


def augmenter(aug: AugmentConfig, seed: int):
    """uint8 batches -> uint8 batches, each image moved, flipped, turned, cropped and lit its own random way by Keras'
    preprocessing layers (in training mode: they are the identity otherwise)."""
    from tf_keras import Sequential, layers

    stack = []
    if aug.zoom:  # zooming in only: a random crop, resized back (Keras 2 has no RandomResizedCrop)
        stack.append(layers.RandomZoom((-aug.zoom, 0.0), fill_mode="reflect", seed=seed))
    if aug.translate:  # nearest: whole-pixel shifts keep the pixel values
        stack.append(layers.RandomTranslation(aug.translate, aug.translate, fill_mode="reflect",
                                              interpolation="nearest", seed=seed + 1))
    if aug.rotate:
        stack.append(layers.RandomRotation(aug.rotate, fill_mode="reflect", seed=seed + 2))
    if aug.flip != "none":
        stack.append(layers.RandomFlip(aug.flip, seed=seed + 3))
    if aug.brightness:
        stack.append(layers.RandomBrightness(aug.brightness, value_range=(0, 255), seed=seed + 4))
    if aug.contrast:
        stack.append(layers.RandomContrast(aug.contrast, seed=seed + 5))
    model = Sequential(stack, name="augmentation")

    def augment(x: tf.Tensor) -> tf.Tensor:
        out = model(tf.cast(x, tf.float32), training=True) if stack else tf.cast(x, tf.float32)
        return tf.cast(tf.clip_by_value(tf.round(out), 0, 255), tf.uint8)

    return augment


def read_shard(url: str, opts: FeedOptions) -> tuple[tf.Tensor, tf.Tensor]:
    """One petastorm pass over this worker's shard (row groups in seeded random order) into memory:
    (n, H, W, C) uint8 pixels and (n,) int32 labels. The reader and its threads are gone when this returns."""
    import numpy as np

    pixels, labels = [], []
    with open_batch_reader(url, columns=["image", "label"], num_epochs=1, shuffle_row_groups=True,
                           shard=opts.shard, shard_count=opts.shard_count, seed=opts.seed,
                           workers=opts.reader_threads) as reader:
        for batch in reader:
            if opts.encoded:  # the same decoder as the streamed feed, evaluation and inference
                pixels.append(decode_batch(tf.constant(list(batch.image)), opts.shape).numpy())
            else:
                raw = np.frombuffer(b"".join(batch.image), np.uint8)
                if raw.size != len(batch.image) * math.prod(opts.shape):
                    raise ValueError(f"{url}: images are not all {'x'.join(map(str, opts.shape))} uint8")
                pixels.append(raw.reshape(-1, *opts.shape))
            labels.append(np.asarray(batch.label, np.int32))
    if not pixels:
        raise ValueError(f"{url}: shard {opts.shard} of {opts.shard_count} is empty")
    return tf.constant(np.concatenate(pixels)), tf.constant(np.concatenate(labels))


def _prefetched(ds: tf.data.Dataset) -> tf.data.Dataset:
    """`ds` prefetched, with tf.data's model-based autotuning off: its optimizer thread sleeps for periods that
    double up to a minute, and destroying an iterator waits for its next wake-up (seconds at the end of a long
    pass). Parallel maps still use every core and the prefetch buffer still adapts to the consumer."""
    options = tf.data.Options()
    options.autotune.enabled = False
    return ds.prefetch(tf.data.AUTOTUNE).with_options(options)


def _with_weights(ds: tf.data.Dataset, opts: FeedOptions) -> tf.data.Dataset:
    """(x, y) batches -> (x, y, per-example loss weights): class weights from the manifest, or ones."""
    weights = tf.constant(opts.class_weights or [1.0], tf.float32)
    if opts.class_weights:
        return ds.map(lambda x, y: (x, y, tf.gather(weights, y)))
    return ds.map(lambda x, y: (x, y, tf.ones_like(y, tf.float32)))


@contextlib.contextmanager
def split_dataset(url: str, opts: FeedOptions, *, endless: bool) -> Iterator[tf.data.Dataset]:
    """Batches (pixels, labels, sample_weights) from this worker's shard.

    endless=True (training): repeated forever; the caller takes exactly the steps it needs, so every worker runs
    the same number of steps whatever its shard size.
    - streamed (opts.cache False): petastorm reads on, row groups reshuffled every pass, rows mixed in a
      shuffle buffer of opts.shuffle_buffer.
    - cached: petastorm reads the shard once (read_shard); every pass is then a full, seeded shuffle of the rows
      in memory, gathered a batch at a time (no reader threads, no per-row tf.data work).
    endless=False (validation): one pass over the shard, every row once, no shuffling; see ValidationFeed for
    keeping it in memory between epochs.
    """
    if endless and opts.cache:
        pixels, labels = read_shard(url, opts)
        ds = tf.data.Dataset.range(int(labels.shape[0]))
        ds = ds.shuffle(int(labels.shape[0]), seed=opts.seed, reshuffle_each_iteration=True).repeat()
        ds = ds.batch(opts.batch_size, drop_remainder=True)
        ds = ds.map(lambda i: (tf.gather(pixels, i), tf.gather(labels, i)))
        if opts.augment:
            augment = augmenter(opts.augment, opts.seed)
            ds = ds.map(lambda x, y: (augment(x), y), num_parallel_calls=tf.data.AUTOTUNE)
        yield _prefetched(_with_weights(ds, opts))
        return

    from petastorm.tf_utils import make_petastorm_dataset

    reader = open_batch_reader(url, columns=["image", "label"], num_epochs=None if endless else 1,
                               shuffle_row_groups=endless, shard=opts.shard, shard_count=opts.shard_count,
                               seed=opts.seed, workers=opts.reader_threads)
    try:
        ds = make_petastorm_dataset(reader)
        ds = ds.map(lambda b: _decode(b.image, b.label, opts.shape, opts.encoded), num_parallel_calls=tf.data.AUTOTUNE)
        ds = ds.unbatch()
        if endless:
            ds = ds.shuffle(opts.shuffle_buffer, seed=opts.seed, reshuffle_each_iteration=True)
        ds = ds.batch(opts.batch_size, drop_remainder=endless)
        if endless and opts.augment:
            augment = augmenter(opts.augment, opts.seed)
            ds = ds.map(lambda x, y: (augment(x), y), num_parallel_calls=tf.data.AUTOTUNE)
        yield _prefetched(_with_weights(ds, opts))
    finally:
        reader.stop()
        reader.join()


class ValidationFeed:
    """One pass over this worker's validation shard per epoch. With opts.cache the shard is read once, on the
    first epoch, and every later pass comes from memory; otherwise petastorm streams it every epoch."""

    def __init__(self, url: str, opts: FeedOptions):
        self.url, self.opts = url, opts
        self._cached: tf.data.Dataset | None = None

    @contextlib.contextmanager
    def one_pass(self) -> Iterator[tf.data.Dataset]:
        """(pixels, labels, weights) batches covering every row of the shard once."""
        if not self.opts.cache:
            with split_dataset(self.url, self.opts, endless=False) as ds:
                yield ds
            return
        if self._cached is None:
            pixels, labels = read_shard(self.url, self.opts)
            ds = tf.data.Dataset.from_tensor_slices((pixels, labels)).batch(self.opts.batch_size)
            self._cached = _prefetched(_with_weights(ds, self.opts))
        yield self._cached
