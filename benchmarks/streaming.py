"""Streaming inference: image files arriving at a steady rate into a folder watched by `infer.input_type: stream`
(micro-batches every second) against batch `infer` on the same files, same model, same cores, in one run.

    .venv/bin/python benchmarks/streaming.py [--files 3000] [--rate 100]

Prints the stream's rows/s while files arrive and after (its backlog drained), the time from a file's arrival to its
committed output (median and max over the micro-batches), and batch infer's rows/s on the same files.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import threading
import time

from common import BENCH_DIR, ROOT, bench_dataset, bench_model, record


def write_pngs(ds, count: int, folder) -> list:
    """`count` test images of the dataset as PNG files, to deliver later (pixels only on this benchmark's side)."""
    import numpy as np
    import pyarrow.parquet as pq
    from PIL import Image

    table = pq.read_table(ds.split_path("test"), columns=["image"]).slice(0, count)
    folder.mkdir(parents=True)
    paths = []
    for i, raw in enumerate(table.column("image").to_pylist()):
        path = folder / f"img{i:06d}.png"
        Image.fromarray(np.frombuffer(raw, np.uint8).reshape(28, 28)).save(path)
        paths.append(path)
    return paths


def deliver(paths: list, inbox, output, rate: float, done: threading.Event) -> None:
    """Move the files into the inbox at `rate` files/s (a rename each, as a writer should deliver them), after a
    first file whose micro-batch starts the stream's Python workers and loads the model (its fixed cost, measured
    apart: the steady rate is what the figures are about)."""
    os.rename(paths[0], inbox / paths[0].name)
    while not any(output.glob("batch_id=*")):
        time.sleep(0.2)
    start = time.monotonic()
    for i, path in enumerate(paths[1:]):
        time.sleep(max(0.0, start + i / rate - time.monotonic()))
        os.utime(path)  # its arrival time: the stream measures latency from a file's modification time
        os.rename(path, inbox / path.name)
    done.set()


def stop_when_scored(output, total: int, delivered: threading.Event) -> None:
    """SIGTERM this process (the stream's own stop) once every file has a committed prediction."""
    import pyarrow.dataset as pads

    while True:
        time.sleep(1)
        if delivered.is_set() and any(output.glob("batch_id=*")):
            if pads.dataset(str(output), format="parquet", partitioning="hive").count_rows() >= total:
                os.kill(os.getpid(), signal.SIGTERM)
                return


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=3000)
    ap.add_argument("--rate", type=float, default=100.0, help="files arriving per second")
    args = ap.parse_args()

    from pipelines.config import load_config
    from pipelines.console import quiet_libraries

    quiet_libraries(False)
    import mlflow
    import numpy as np

    from pipelines.inference.job import run_infer
    from pipelines.signals import Stopped, stop_on_signals
    from pipelines.spark import get_spark

    work = BENCH_DIR / "stream"
    shutil.rmtree(work, ignore_errors=True)
    sets = [f"paths.datasets_root={BENCH_DIR}/datasets", "ingest.name=bench_fmnist",
            f"mlflow.tracking_uri=sqlite:///{work}/mlflow.db", f"mlflow.artifact_location={work}/mlartifacts",
            "mlflow.registered_model=bench_model"]
    cfg = load_config([ROOT / "conf/local.yaml"], sets)
    spark = get_spark(cfg)
    ds = bench_dataset(spark, cfg)
    m = ds.manifest()
    uri = bench_model(cfg, m)
    paths = write_pngs(ds, args.files, work / "outbox")

    # Batch infer on the same files (they are scored in place first, then delivered to the stream).
    batch = run_infer(spark, load_config([ROOT / "conf/local.yaml"], [
        *sets, "infer.input_type=files", f"infer.input={work / 'outbox'}", f"infer.model_uri={uri}",
        f"infer.output={work / 'batch'}"]))
    inbox, output = work / "inbox", work / "streamed"
    inbox.mkdir()
    stream_cfg = load_config([ROOT / "conf/local.yaml"], [
        *sets, "infer.input_type=stream", f"infer.input={inbox}", f"infer.model_uri={uri}", f"infer.output={output}",
        "infer.trigger=processing_time", "infer.trigger_seconds=1"])
    delivered = threading.Event()
    threading.Thread(target=deliver, args=(paths, inbox, output, args.rate, delivered), daemon=True).start()
    threading.Thread(target=stop_when_scored, args=(output, args.files, delivered), daemon=True).start()
    t0 = time.perf_counter()
    try:
        with stop_on_signals():
            run_infer(spark, stream_cfg)
    except Stopped:
        pass
    stream_s = time.perf_counter() - t0
    client = mlflow.MlflowClient()
    run = client.search_runs([client.get_experiment_by_name(cfg.mlflow.experiment).experiment_id],
                             "tags.`sparkvision.stage` = 'infer'", order_by=["start_time DESC"], max_results=1)[0]
    steady = lambda key: [x.value for x in sorted(client.get_metric_history(run.info.run_id, key),  # noqa: E731
                                                   key=lambda x: x.step) if x.step > 0]  # after the warm-up batch
    p50, worst = steady("arrival_to_output_p50_s"), steady("arrival_to_output_max_s")
    rates, rows = steady("batch_rows_per_second"), steady("batch_rows_scored")
    first = min(client.get_metric_history(run.info.run_id, "arrival_to_output_max_s"), key=lambda x: x.step)
    warm_s = first.value
    spark.stop()
    print(f"\n== streaming inference, mnist_cnn, {args.files} PNG files arriving at {args.rate:g}/s, local[2]")
    for name, value, unit in [
            ("batch infer on the same files (one job, start-up included)", batch["images_per_second"], "images/s"),
            ("stream: warm-up, first file to its output (start-up)", warm_s, "s"),
            ("stream: micro-batches' rows/s (row-weighted mean)", float(np.average(rates, weights=rows)), "images/s"),
            ("stream: arrival to output, median over micro-batches", float(np.median(p50)), "s"),
            ("stream: arrival to output, worst file", float(max(worst)), "s")]:
        print(f"  {name:<58} {value:>10.1f} {unit}")
    print(f"  {len(p50)} micro-batches after the warm-up one, {args.files - 1} files arriving at {args.rate:g}/s; "
          f"the whole stream, start-up included, took {stream_s:.0f}s")
    what = f"streaming inference, {args.files:,} PNG files arriving at {args.rate:g}/s"
    record(f"{what}, arrival to output per micro-batch (median)", None, p50, "s", None,
           note=f"worst file {max(worst):.1f} s; start-up {warm_s:.0f} s")
    record(f"{what}, micro-batch rows/s vs batch infer of the same files", [batch["images_per_second"]], rates,
           "img/s", None, note="batch infer includes its start-up")


if __name__ == "__main__":
    main()
