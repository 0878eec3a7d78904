"""Batch inference: Spark (local[2], the infer job's predict() over Parquet, written to Parquet) vs in-process
model.predict on the same rows held in memory, same model, same cores, side by side in one run.

    .venv/bin/python benchmarks/inference.py [--rows N] [--repeat 3] [--scale 10000 100000 1000000]

Goal: Spark >= 0.8x the in-memory images/s. Both sides are compared warm (model loaded, graph traced);
the cold Spark pass is printed too, and so are MLflow's own mlflow.pyfunc.spark_udf and Spark's own
pyspark.ml.functions.predict_batch_udf on the same model (no goal). Then the scaling curve: warm predict() over
10k, 100k and 1M rows (the split repeated on the executors), with the peak resident memory of the driver, the JVM
and one executor Python worker at each size (goals: seconds per 1,000 rows and peak memory within 20%).
"""
from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path
from statistics import median

from common import (BENCH_DIR, ROOT, bench_dataset, bench_model, peak_rss_mb, record, repeat, report,
                    reset_peak_rss)


def scorer(uri: str, tracking_uri: str, batch_size: int):
    """predict_batch_udf's make_predict_fn: on each executor, the model loaded once, scored as predict() does."""
    def make_predict_fn():
        import numpy as np

        from pipelines.inference.predict import load_keras_model, predict_pixels

        net = load_keras_model(uri, tracking_uri)
        return lambda images: predict_pixels(net, images.astype(np.uint8), batch_size)
    return make_predict_fn


def passes(scored, name: str, n: int) -> list[float]:
    """Seconds to write `scored()` to Parquet, n times (the first pass starts cold)."""
    seconds = []
    for _ in range(n):
        t0 = time.perf_counter()
        scored().write.mode("overwrite").parquet((BENCH_DIR / "infer" / name).as_uri())
        seconds.append(time.perf_counter() - t0)
    return seconds


def processes(spark) -> tuple[int, list[int]]:
    """The Spark JVM's pid (driver and executor in one, on local[N]) and its Python workers' pids."""
    jvm = spark.sparkContext._gateway.proc.pid
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])

    def descendants(pid: int) -> list[int]:
        kids = [p for p, parent in parents.items() if parent == pid]
        return kids + [d for k in kids for d in descendants(k)]
    return jvm, descendants(jvm)


def about(spark, source, n: int):
    """About n rows of `source` (repeated when it has fewer), drawn on the executors in every partition: a limit()
    would put them all in one partition, on one core."""
    from pyspark.sql import functions as F

    have = source.count()
    copies = -(-n // have)
    if copies > 1:
        source = source.crossJoin(F.broadcast(spark.range(copies).withColumnRenamed("id", "copy")))
    return source.where(F.rand(7) < n / (copies * have)).select("id", "image")


def scaling(spark, source, uri: str, sizes: list[int], batch_size: int) -> list[dict]:
    """Warm predict() over `sizes` rows (the split's rows repeated on the executors), with the peak resident
    memory of this driver process, the JVM and the largest Python worker during each size."""
    from pipelines.inference.predict import predict

    points = []
    for n in sizes:
        rows = about(spark, source, n)
        jvm, workers = processes(spark)
        for pid in [os.getpid(), jvm, *workers]:
            reset_peak_rss(pid)
        seconds = passes(lambda: predict(rows, uri, batch_size=batch_size), "scaled", 1)[0]
        _, workers = processes(spark)
        points.append({"rows": n, "seconds": seconds, "driver_mb": peak_rss_mb(os.getpid()),
                       "jvm_mb": peak_rss_mb(jvm), "worker_mb": max([peak_rss_mb(w) for w in workers], default=0)})
        print(f"  {n:>9} rows: {seconds:6.1f}s, {1000 * seconds / n:.3f} s per 1,000 rows; peak RSS: Python driver "
              f"{points[-1]['driver_mb']:.0f} MiB, JVM {points[-1]['jvm_mb']:.0f} MiB, "
              f"largest Python worker {points[-1]['worker_mb']:.0f} MiB", flush=True)
    return points


def record_scaling(points: list[dict]) -> None:
    """Report rows: cost per 1,000 rows and peak memory at the largest size against the smallest."""
    small, large = points[0], points[-1]
    sizes = [p["rows"] for p in points]
    per_k = [1000 * p["seconds"] / p["rows"] for p in points]
    span = f"{small['rows']:,} -> {large['rows']:,} rows"
    record(f"inference scaling, s per 1,000 rows, {span}", [per_k[0]], [per_k[-1]], "s per 1,000 rows", 1 / 1.2,
           ratio_of="smallest / largest", lower_is_better=True, note="linear growth: within 20%",
           curve={"x": sizes, "y": per_k, "x_label": "rows", "y_label": "s per 1,000 rows"})
    for key, what in (("driver_mb", "Python driver"), ("jvm_mb", "driver JVM (local: executor too)"),
                      ("worker_mb", "one executor Python worker")):
        record(f"inference peak RSS, {what}, {span}", [small[key]], [large[key]], "MiB", 1 / 1.2,
               ratio_of="smallest / largest", lower_is_better=True, note="flat: within 20%",
               curve={"x": sizes, "y": [p[key] for p in points], "x_label": "rows", "y_label": f"{what} peak MiB"})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--rows", type=int, default=0, help="score only this many rows of the split (0: all)")
    ap.add_argument("--repeat", type=int, default=3, help="warm passes of each side")
    ap.add_argument("--scale", type=int, nargs="*", default=[10_000, 100_000, 1_000_000],
                    help="row counts for the scaling curve (none: skip it)")
    ap.add_argument("--set", action="append", default=[], dest="overrides", help="config override, e.g. spark.master=local[1]")
    args = ap.parse_args()

    from pipelines.config import load_config
    from pipelines.console import quiet_libraries

    quiet_libraries(False)
    import mlflow
    import numpy as np
    import pyarrow.parquet as pq

    from pyspark.ml.functions import predict_batch_udf
    from pyspark.sql import types as T

    from pipelines.inference.predict import load_keras_model, pixel_array, predict
    from pipelines.spark import get_spark

    shutil.rmtree(BENCH_DIR / "infer", ignore_errors=True)
    cfg = load_config([ROOT / "conf/local.yaml"], [
        f"paths.datasets_root={BENCH_DIR}/datasets", "ingest.name=bench_fmnist",
        f"mlflow.tracking_uri=sqlite:///{BENCH_DIR}/infer/mlflow.db",
        f"mlflow.artifact_location={BENCH_DIR}/infer/mlartifacts", "mlflow.registered_model=bench_model", *args.overrides])
    spark = get_spark(cfg)
    ds = bench_dataset(spark, cfg)
    m = ds.manifest()
    uri = bench_model(cfg, m)

    split = ds.split_path("train")
    spark.read.parquet(split.as_uri()).limit(1000).count()  # warm the JVM
    source = spark.read.parquet(split.as_uri())
    if args.rows:
        source = about(spark, source, args.rows)
    rows = source.count()
    # Spark: read Parquet, score on the executors, write Parquet (what `sparkvision infer` does). The 1st pass is
    # cold (Python workers start, import TensorFlow, load the model, trace); the rest are warm.
    spark_s = passes(lambda: predict(source.select("id", "image"), uri, batch_size=args.batch_size), "preds",
                     1 + args.repeat)
    # MLflow's own way, for comparison: spark_udf on the same model, fed the pixels as array<int> (pixel_array)
    udf = mlflow.pyfunc.spark_udf(spark, uri, result_type="array<float>", env_manager="local")
    udf_s = passes(lambda: source.select("id", udf(pixel_array("image")).alias("probs")), "udf_preds", 2)
    # Spark's own way: pyspark.ml.functions.predict_batch_udf, the same model and compiled call per batch
    batch_udf = predict_batch_udf(scorer(uri, mlflow.get_tracking_uri(), args.batch_size),
                                  return_type=T.ArrayType(T.FloatType()), batch_size=args.batch_size,
                                  input_tensor_shapes=[list(m.shape)])
    batch_udf_s = passes(lambda: source.select("id", batch_udf(pixel_array("image")).alias("probs")),
                         "batch_udf_preds", 2)
    points = scaling(spark, spark.read.parquet(split.as_uri()), uri, args.scale, args.batch_size) if args.scale else []
    spark.stop()

    # In memory: the same rows as one numpy array, model.predict in this process
    table = pq.read_table(split, columns=["image"]).slice(0, rows)
    x = np.frombuffer(b"".join(table.column("image").to_pylist()), np.uint8).reshape(-1, *m.shape)
    net = load_keras_model(uri)
    net.predict(x[:args.batch_size], batch_size=args.batch_size, verbose=0)  # warm-up, like Spark's 2nd pass

    def in_memory() -> float:
        t0 = time.perf_counter()
        net.predict(x, batch_size=args.batch_size, verbose=0)
        return time.perf_counter() - t0
    mem_s = repeat(args.repeat, in_memory)
    warm = spark_s[1:]
    report(f"batch inference, mnist_cnn, {rows} Fashion-MNIST images, batch {args.batch_size}, 2 cores",
           [("in-process model.predict on numpy in memory (warm, median)", rows / median(mem_s), "images/s"),
            ("Spark local[2]: Parquet -> predict() -> Parquet, cold workers", rows / spark_s[0], "images/s"),
            ("Spark local[2]: Parquet -> predict() -> Parquet, warm (median)", rows / median(warm), "images/s"),
            ("Spark local[2]: mlflow.pyfunc.spark_udf(pixel_array), warm", rows / udf_s[1], "images/s"),
            ("Spark local[2]: pyspark predict_batch_udf(pixel_array), warm", rows / batch_udf_s[1], "images/s")],
           "Spark (warm) / in-memory (warm)", median(mem_s) / median(warm), 0.8)
    print(f"  cold Spark / in-memory: {median(mem_s) / spark_s[0]:.2f}x (the first pass also starts the Python "
          f"workers, imports TensorFlow and loads the model: {spark_s[0] - median(warm):.1f}s more)")
    per_s = lambda seconds: [rows / s for s in seconds]  # noqa: E731
    record(f"batch inference, {rows:,} images, predict() warm vs model.predict", per_s(mem_s), per_s(warm), "img/s",
           0.8)
    record(f"batch inference, {rows:,} images, predict() cold vs model.predict", per_s(mem_s), per_s(spark_s[:1]),
           "img/s", None, note="cold: Python workers start, TensorFlow import, model load")
    record(f"batch inference, {rows:,} images, mlflow spark_udf warm vs model.predict", per_s(mem_s),
           per_s(udf_s[1:]), "img/s", None)
    record(f"batch inference, {rows:,} images, predict_batch_udf warm vs model.predict", per_s(mem_s),
           per_s(batch_udf_s[1:]), "img/s", None)
    if points:
        record_scaling(points)


if __name__ == "__main__":
    main()
