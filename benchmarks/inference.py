"""Batch inference: Spark (local[2], the infer job's predict() over Parquet, written to Parquet) vs in-process
model.predict on the same rows held in memory, same model, same cores, side by side in one run.

    .venv/bin/python benchmarks/inference.py [--rows 60000]

Goal: Spark >= 0.8x the in-memory images/s. Both sides are compared warm (model loaded, graph traced);
the cold Spark pass is printed too, and so are MLflow's own mlflow.pyfunc.spark_udf and Spark's own
pyspark.ml.functions.predict_batch_udf on the same model (no goal).
"""
from __future__ import annotations

import argparse
import shutil
import time

from common import BENCH_DIR, ROOT, bench_dataset, bench_model, report


def scorer(uri: str, tracking_uri: str, batch_size: int):
    """predict_batch_udf's make_predict_fn: on each executor, the model loaded once, scored as predict() does."""
    def make_predict_fn():
        import numpy as np

        from pipelines.inference.predict import load_keras_model, predict_pixels

        net = load_keras_model(uri, tracking_uri)
        return lambda images: predict_pixels(net, images.astype(np.uint8), batch_size)
    return make_predict_fn


def twice(scored, name: str) -> list[float]:
    """Seconds to write `scored()` to Parquet, a cold pass then a warm one."""
    seconds = []
    for _ in range(2):
        t0 = time.perf_counter()
        scored().write.mode("overwrite").parquet((BENCH_DIR / "infer" / name).as_uri())
        seconds.append(time.perf_counter() - t0)
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch-size", type=int, default=512)
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
    rows = pq.read_metadata(next(split.glob("*.parquet"))).num_rows and sum(
        pq.read_metadata(f).num_rows for f in split.glob("*.parquet"))
    # Spark: read Parquet, score on the executors, write Parquet (what `sparkvision infer` does)
    spark.read.parquet(split.as_uri()).limit(1000).count()  # warm the JVM
    source = spark.read.parquet(split.as_uri())
    # 1st pass: cold Python workers (TensorFlow import, model load, tracing); 2nd: warm
    spark_s = twice(lambda: predict(source.select("id", "image"), uri, batch_size=args.batch_size), "preds")
    # MLflow's own way, for comparison: spark_udf on the same model, fed the pixels as array<int> (pixel_array)
    udf = mlflow.pyfunc.spark_udf(spark, uri, result_type="array<float>", env_manager="local")
    udf_s = twice(lambda: source.select("id", udf(pixel_array("image")).alias("probs")), "udf_preds")
    # Spark's own way: pyspark.ml.functions.predict_batch_udf, the same model and compiled call per batch
    batch_udf = predict_batch_udf(scorer(uri, mlflow.get_tracking_uri(), args.batch_size),
                                  return_type=T.ArrayType(T.FloatType()), batch_size=args.batch_size,
                                  input_tensor_shapes=[list(m.shape)])
    batch_udf_s = twice(lambda: source.select("id", batch_udf(pixel_array("image")).alias("probs")),
                        "batch_udf_preds")
    spark.stop()

    # In memory: the same rows as one numpy array, model.predict in this process
    table = pq.read_table(split, columns=["image"])
    x = np.frombuffer(b"".join(table.column("image").to_pylist()), np.uint8).reshape(-1, *m.shape)
    net = load_keras_model(uri)
    net.predict(x[:args.batch_size], batch_size=args.batch_size, verbose=0)  # warm-up, like Spark's 2nd pass
    t0 = time.perf_counter()
    net.predict(x, batch_size=args.batch_size, verbose=0)
    mem_s = time.perf_counter() - t0
    report(f"batch inference, mnist_cnn, {rows} Fashion-MNIST images, batch {args.batch_size}, 2 cores",
           [("in-process model.predict on numpy in memory (warm)", rows / mem_s, "images/s"),
            ("Spark local[2]: Parquet -> predict() -> Parquet, cold workers", rows / spark_s[0], "images/s"),
            ("Spark local[2]: Parquet -> predict() -> Parquet, warm workers", rows / spark_s[1], "images/s"),
            ("Spark local[2]: mlflow.pyfunc.spark_udf(pixel_array), warm", rows / udf_s[1], "images/s"),
            ("Spark local[2]: pyspark predict_batch_udf(pixel_array), warm", rows / batch_udf_s[1], "images/s")],
           "Spark (warm) / in-memory (warm)", mem_s / spark_s[1], 0.8)
    print(f"  cold Spark / in-memory: {mem_s / spark_s[0]:.2f}x (the first pass also starts the Python workers, "
          f"imports TensorFlow and loads the model: {spark_s[0] - spark_s[1]:.1f}s more)")


if __name__ == "__main__":
    main()
