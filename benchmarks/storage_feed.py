"""Compact storage for large images: bytes per stored image and training-feed images/s for one worker, for
`ingest.storage` pixels, encoded JPEG and encoded PNG at 64, 128 and 224 pixels, side by side with tf.data from
in-memory numpy (the ceiling: no Parquet, no decoding). The same photos go through the real ingest job for each.

    python benchmarks/storage_feed.py [--images 1200] [--sizes 64 128 224] [--seconds 3]
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import time

from common import BENCH_DIR, ROOT, record

STORAGES = (("pixels", "jpeg"), ("encoded", "jpeg"), ("encoded", "png"))


def feed_rate(ds, seconds: float) -> float:
    """Images/s of the streamed training feed for one worker (a shard of 1), after one warm-up batch."""
    from pipelines.train.data import FeedOptions, split_dataset

    manifest = ds.manifest()
    opts = FeedOptions(manifest.shape, 64, 0, 1, reader_threads=2, cache=False, encoded=manifest.encoded)
    with split_dataset(ds.split_path("train").as_uri(), opts, endless=True) as batches:
        it = iter(batches)
        next(it)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            n += int(next(it)[0].shape[0])
        return n / (time.perf_counter() - t0)


def in_memory_rate(ds, seconds: float) -> float:
    """The same loop over tf.data from numpy already in memory (pixels read here once; a benchmark, not a job)."""
    import numpy as np
    import pyarrow.parquet as pq
    import tensorflow as tf

    shape = ds.manifest().shape
    table = pq.read_table(ds.split_path("train"), columns=["image", "label"])
    pixels = np.frombuffer(b"".join(table.column("image").to_pylist()), np.uint8).reshape(-1, *shape)
    labels = np.asarray(table.column("label").to_pylist(), np.int32)
    batches = iter(tf.data.Dataset.from_tensor_slices((pixels, labels)).shuffle(2048).repeat().batch(64)
                   .prefetch(tf.data.AUTOTUNE))
    next(batches)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        n += int(next(batches)[0].shape[0])
    return n / (time.perf_counter() - t0)


def training_step_rate(ds, model_name: str, batch: int, steps: int) -> float:
    """Images/s the training step consumes at this size: `model_name` (the photos profile's backbone) trained on
    batches already in memory, in the precision `train.mixed_precision: auto` picks on this CPU."""
    import numpy as np
    import tf_keras as keras

    from pipelines.models import build_model
    from pipelines.train.devices import cpu_flags, precision_policy

    m = ds.manifest()
    keras.mixed_precision.set_global_policy(precision_policy("auto", False, "amx_bf16" in cpu_flags()))
    model = build_model(model_name, m.shape, m.num_classes, m.mean, m.std)
    model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (batch, *m.shape), dtype=np.uint8)
    y = rng.integers(0, m.num_classes, batch).astype(np.int32)
    model.train_on_batch(x, y)  # the first step traces
    t0 = time.perf_counter()
    for _ in range(steps):
        model.train_on_batch(x, y)
    rate = steps * batch / (time.perf_counter() - t0)
    keras.mixed_precision.set_global_policy("float32")
    return rate


def stored_bytes_per_image(ds) -> float:
    files = list(ds.split_path("train").glob("*.parquet"))
    return sum(f.stat().st_size for f in files) / ds.manifest().count("train")


def spread(values: list[float]) -> str:
    return f"{min(values):>8.0f} {statistics.median(values):>8.0f} {max(values):>8.0f}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=1200)
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 224])
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model", default="mobilenet_v2", help="the backbone whose training step the feed must outrun")
    ap.add_argument("--train-steps", type=int, default=3, help="timed training steps per repetition (batch 32)")
    args = ap.parse_args()

    from ingest_folder import build_photos

    from pipelines.config import load_config
    from pipelines.console import quiet_libraries, hush
    from pipelines.dataset.contract import resolve_dataset
    from pipelines.ingest.job import run_ingest
    from pipelines.spark import get_spark

    quiet_libraries(False)
    photos = BENCH_DIR / "photos"
    build_photos(photos, args.images)
    common = [f"paths.datasets_root={BENCH_DIR}/datasets", "spark.master=local[2]", "ingest.source.type=folder",
              f"ingest.source.path={photos}", "ingest.image.channels=3", "ingest.row_group_rows=64"]
    spark = get_spark(load_config([ROOT / "conf/local.yaml"], common))
    print(f"\n== storage and feed, {args.images} photos, one worker's streamed feed (batch 64), images/s "
          f"min/median/max of {args.repeats}")
    print(f"  {'size':>4} {'storage':<14} {'bytes/image':>11} {'feed img/s (min med max)':>28} {'in-memory numpy':>26}")
    for size in args.sizes:
        step = None
        for storage, fmt in STORAGES:
            name = f"bench_storage_{size}_{storage}_{fmt}"
            shutil.rmtree(BENCH_DIR / "datasets" / name, ignore_errors=True)
            cfg = load_config([ROOT / "conf/local.yaml"], common + [
                f"ingest.name={name}", f"ingest.image.height={size}", f"ingest.image.width={size}",
                f"ingest.storage={storage}", f"ingest.encoding.format={fmt}"])
            with hush():
                run_ingest(spark, cfg)
            ds = resolve_dataset(cfg.paths.datasets_root, name)
            feed = [feed_rate(ds, args.seconds) for _ in range(args.repeats)]
            base = spread([in_memory_rate(ds, args.seconds) for _ in range(args.repeats)]) if storage == "pixels" else ""
            label = storage if storage == "pixels" else f"{storage} {fmt}"
            print(f"  {size:>4} {label:<14} {stored_bytes_per_image(ds):>11.0f} {spread(feed):>28} {base:>26}",
                  flush=True)
            step = step or [training_step_rate(ds, args.model, 32, args.train_steps) for _ in range(args.repeats)]
            record(f"training feed, {size}x{size} photos, {label}, streamed, vs the {args.model} training step",
                   step, feed, "img/s", 5.0, ratio_of="feed / training step",
                   note=f"{stored_bytes_per_image(ds):,.0f} bytes per stored image")
        print(f"  {size:>4} {args.model} training step (batch 32, in memory): {spread(step)} img/s", flush=True)
    spark.stop()


if __name__ == "__main__":
    main()
