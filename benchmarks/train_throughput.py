"""Training throughput: plain model.fit on in-memory numpy vs the pipeline (petastorm -> Horovod) with 1 and 2
workers, same model, same per-worker batch size, same cores, measured side by side in one run.

    .venv/bin/python benchmarks/train_throughput.py [--model mnist_cnn] [--batch-size 128] [--epochs 2]
        [--set train.mixed_precision=off]

Goals: 1 worker >= 0.9x the in-memory images/s; 2 workers not slower in total than 1; input wait < 5%.
Figures are taken from the last epoch (the first one includes graph tracing in both). The ceiling line runs two
independent single-thread in-memory fits at once (no Horovod): how much 2 workers could reach here at best. A short
2-worker run with train.horovod_timeline breaks a step down: the compute until rank 0's last gradient, the wait on
Horovod after it, and how long a gradient allreduce ran beside the compute.
"""
from __future__ import annotations

import argparse
import os
import shutil
import time

from statistics import median

from common import BENCH_DIR, ROOT, bench_dataset, record, report


def in_memory_fit(manifest, train_dir, model_name: str, batch: int, epochs: int,
                  part: tuple[int, int] = (0, 1), policy: str = "float32") -> list[float]:
    """Images/s of keras model.fit on numpy arrays held in memory, each epoch after the first (which traces);
    `part` (i, n): rows i::n only; `policy`: the Keras dtype policy the pipeline's workers train with."""
    import numpy as np
    import pyarrow.parquet as pq
    import tf_keras as keras

    from pipelines.models import build_model

    keras.mixed_precision.set_global_policy(policy)

    table = pq.read_table(train_dir, columns=["image", "label"])
    x = np.frombuffer(b"".join(table.column("image").to_pylist()), np.uint8).reshape(-1, *manifest.shape)
    y = np.asarray(table.column("label").to_pylist(), np.int32)
    x, y = x[part[0]::part[1]], y[part[0]::part[1]]
    model = build_model(model_name, manifest.shape, manifest.num_classes, manifest.mean, manifest.std)
    model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy", metrics=["accuracy"])
    times = []

    class Clock(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.t0 = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            times.append(time.perf_counter() - self.t0)

    steps = len(x) // batch
    model.fit(x[: steps * batch], y[: steps * batch], batch_size=batch, epochs=epochs, verbose=0, callbacks=[Clock()])
    return [steps * batch / t for t in times[1:]]


def _single_thread_fit(args: tuple) -> list[float]:
    """One process with a worker's thread budget (1 intra-op thread, and the worker's cores when train.bind_cores
    binds workers), in-memory fit on its half of the rows."""
    manifest, train_dir, model_name, batch, epochs, part, bind, policy = args
    import os

    from pipelines.console import quiet_libraries

    quiet_libraries(False)  # a spawned process: TensorFlow's AutoGraph warnings, as in the parent
    if bind:
        from pipelines.train.devices import bind_to_cores, core_group

        bind_to_cores(core_group(sorted(os.sched_getaffinity(0)), part[0], part[1]))
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(2)
    return in_memory_fit(manifest, train_dir, model_name, batch, epochs, part=part, policy=policy)


def two_processes_ceiling(manifest, train_dir, model_name: str, batch: int, epochs: int, bind: bool,
                          policy: str) -> float:
    """Total images/s of 2 independent single-thread model.fit processes at once (no Horovod, no allreduce):
    what 2 workers could reach on these 2 cores if communication were free."""
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(2) as pool:
        return sum(median(rates) for rates in pool.map(
            _single_thread_fit, [(manifest, train_dir, model_name, batch, epochs, (i, 2), bind, policy)
                                 for i in range(2)]))


def _allreduce_cost(nbytes: int, repeats: int) -> dict:
    """One Horovod process of gloo_allreduce_cost: its wall and CPU milliseconds per allreduce."""
    import resource

    import numpy as np
    import tensorflow as tf
    import horovod.tensorflow as hvd

    tf.config.threading.set_intra_op_parallelism_threads(1)
    hvd.init()
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[hvd.rank() % len(os.sched_getaffinity(0))]})
    grads = tf.constant(np.ones(nbytes // 4, np.float32))
    for _ in range(10):  # Horovod's response cache and Gloo's buffers warm
        hvd.allreduce(grads, op=hvd.Sum)
    usage, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(repeats):
        hvd.allreduce(grads, op=hvd.Sum)
    wall, after = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    cpu = after.ru_utime - usage.ru_utime + after.ru_stime - usage.ru_stime
    return {"wall_ms": 1000 * wall / repeats, "cpu_ms": 1000 * cpu / repeats}


def gloo_allreduce_cost(nbytes: int, cycle_ms: float | None, repeats: int = 200) -> dict:
    """Milliseconds of wall time and of CPU time per worker that one Horovod allreduce of `nbytes` (a step's
    gradients) takes between 2 processes on their own cores with nothing else to do, over Gloo on the loopback
    interface as training runs it: the price of the communication alone, Gloo's and the kernel's, not ours."""
    import horovod

    os.environ.update({"HOROVOD_GLOO_IFACE": "lo", **({"HOROVOD_CYCLE_TIME": f"{cycle_ms:g}"} if cycle_ms else {})})
    per_rank = horovod.run(_allreduce_cost, args=(nbytes, repeats), np=2, use_gloo=True, hosts="localhost:2")
    return {k: median(r[k] for r in per_rank) for k in ("wall_ms", "cpu_ms")}


def gradient_bytes(manifest, model_name: str) -> int:
    """Bytes of the gradients a step allreduces: every trainable weight, float32 (as the variables are, in mixed
    precision too)."""
    from pipelines.models import build_model

    model = build_model(model_name, manifest.shape, manifest.num_classes, manifest.mean, manifest.std)
    return 4 * sum(int(w.shape.num_elements()) for w in model.trainable_weights)


def epoch_rates(cfg, run_id: str) -> list[float]:
    """The run's images/s of each epoch after the first (which traces), from its MLflow metrics."""
    from mlflow import MlflowClient

    history = MlflowClient(tracking_uri=cfg.mlflow.tracking_uri).get_metric_history(run_id, "images_per_second")
    return [m.value for m in sorted(history, key=lambda m: m.step)][1:]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="mnist_cnn")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=4, help="epochs per run: every epoch after the first is a repetition")
    ap.add_argument("--set", action="append", default=[], dest="overrides", help="config override, e.g. train.fp16_allreduce=true")
    args = ap.parse_args()

    from pipelines.config import load_config
    from pipelines.console import quiet_libraries

    quiet_libraries(False)
    from pipelines.spark import get_spark
    from pipelines.train.job import run_train

    shutil.rmtree(BENCH_DIR / "train", ignore_errors=True)
    base = [f"paths.datasets_root={BENCH_DIR}/datasets", f"paths.checkpoints_root={BENCH_DIR}/train/ckpt",
            f"mlflow.tracking_uri=sqlite:///{BENCH_DIR}/train/mlflow.db",
            f"mlflow.artifact_location={BENCH_DIR}/train/mlartifacts", "ingest.name=bench_fmnist",
            f"train.model={args.model}", f"train.batch_size={args.batch_size}", f"train.epochs={args.epochs}",
            "train.schedule=constant", "train.warmup_epochs=0", "train.scale_lr=false", *args.overrides]
    cfg = load_config([ROOT / "conf/local.yaml"], base)
    spark = get_spark(cfg)
    ds = bench_dataset(spark, cfg)
    manifest = ds.manifest()

    results = {}
    for workers in (1, 2):
        out = run_train(spark, load_config([ROOT / "conf/local.yaml"], base + [f"train.num_proc={workers}"]))
        results[workers] = {**out["metrics"], "precision": out["precision"], "rates": epoch_rates(cfg, out["run_id"])}
    # where a 2-worker step's time goes, from Horovod's timeline, in a run of its own (the trace costs a little)
    steps = run_train(spark, load_config([ROOT / "conf/local.yaml"], base + [
        "train.num_proc=2", "train.epochs=2", "train.horovod_timeline=true"]))["horovod_timeline"]
    spark.stop()
    policy = results[1]["precision"]  # the workers' dtype policy (train.mixed_precision on this machine)
    if results[2]["precision"] != policy:
        raise SystemExit(f"1 and 2 workers trained with different precision: {policy}, {results[2]['precision']}")
    baseline = in_memory_fit(manifest, ds.split_path("train"), args.model, args.batch_size, args.epochs,
                             policy=policy)
    ceiling = two_processes_ceiling(manifest, ds.split_path("train"), args.model, args.batch_size, args.epochs,
                                    cfg.train.bind_cores, policy)

    one, two = results[1], results[2]
    one["images_per_second"], two["images_per_second"] = median(one["rates"]), median(two["rates"])
    t = cfg.train
    print(f"\nfeed and Horovod settings: train.cache_mb={t.cache_mb}, train.reader_threads={t.reader_threads} (0 = cores "
          f"per worker), train.horovod_cycle_time_ms={t.horovod_cycle_time_ms} (null = Horovod's 1 ms), "
          f"train.bind_cores={str(t.bind_cores).lower()}")
    report(f"training throughput, {args.model}, batch {args.batch_size}/worker, {policy}, Fashion-MNIST train split, "
           "2 cores",
           [("in-memory model.fit (numpy, median epoch)", median(baseline), "images/s"),
            ("pipeline, 1 Horovod worker", one["images_per_second"], "images/s"),
            ("pipeline, 2 Horovod workers (total)", two["images_per_second"], "images/s"),
            ("input wait, 1 worker", 100 * one["input_wait_fraction"], "% of step time"),
            ("input wait, 2 workers", 100 * two["input_wait_fraction"], "% of step time")],
           "1 worker / in-memory", one["images_per_second"] / median(baseline), 0.9)
    print(f"  {'2 workers / 1 worker':<48} {two['images_per_second'] / one['images_per_second']:>10.2f}x  (goal >= 1.0x)")
    print(f"  {'ceiling: 2 independent 1-thread fits, total':<48} {ceiling:>10.1f} images/s "
          f"({ceiling / median(baseline):.2f}x the 2-thread in-memory fit; 2 workers reach {two['images_per_second'] / ceiling:.2f}x of it)")

    one_thread_ms = 1000 * args.batch_size / (ceiling / 2)  # a step of one of the 2 independent 1-thread fits
    nbytes = gradient_bytes(manifest, args.model)
    gloo = gloo_allreduce_cost(nbytes, cfg.train.horovod_cycle_time_ms)
    print(f"  {'2 workers, a step (Horovod timeline, rank 0)':<48} {steps['step_ms']:>10.1f} ms: compute "
          f"{steps['compute_ms']:.1f} + waiting on Horovod after the last gradient {steps['tail_ms']:.1f}; a gradient "
          f"allreduce ran {steps['allreduce_ms']:.1f} ms of it, beside the compute (a step at 1 thread without Horovod: "
          f"{one_thread_ms:.1f} ms)")
    print(f"  {f'Gloo allreduce of {nbytes / 2**20:.1f} MiB, 2 idle processes':<48} {gloo['wall_ms']:>10.1f} ms "
          f"wall, {gloo['cpu_ms']:.1f} ms of CPU per worker")

    what = f"training, {args.model}, batch {args.batch_size}/worker, {policy}"
    record(f"{what}, 1 Horovod worker vs model.fit", baseline, one["rates"], "img/s", 0.9)
    record(f"{what}, 2 Horovod workers vs 1", one["rates"], two["rates"], "img/s", 1.0,
           note=f"ceiling (2 independent 1-thread fits): {ceiling:.0f} img/s")
    record(f"{what}, 2 workers: ms a step (Horovod timeline) vs a 1-thread step without Horovod", [one_thread_ms],
           [steps["step_ms"]], "ms", None, lower_is_better=True,
           note=f"compute {steps['compute_ms']:.1f} ms + waiting on Horovod after the last gradient "
                f"{steps['tail_ms']:.1f} ms; a gradient allreduce ran {steps['allreduce_ms']:.1f} ms of the step, "
                f"beside the compute (medians of {steps['steps']} steps, rank 0)")
    record(f"Gloo allreduce of {args.model}'s gradients ({nbytes / 2**20:.1f} MiB), 2 processes on their own cores, "
           "ms of CPU per worker", None, [gloo["cpu_ms"]], "ms", None,
           note=f"{gloo['wall_ms']:.1f} ms of wall time; nothing else running: the communication's own price")
    for n, r in ((1, one), (2, two)):
        record(f"{what}, input wait, {n} worker(s)", None, [100 * r["input_wait_fraction"]], "% of step time", None,
               note="goal: under 5%")


if __name__ == "__main__":
    main()
