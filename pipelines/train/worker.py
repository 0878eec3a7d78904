"""The training loop each Horovod worker runs inside a Spark task. Lines marked `# Horovod:` are what
distribution adds to an ordinary single-process Keras loop."""
from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PROGRESS_FILE = "progress.jsonl"


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs, pickled to the executors (no Spark, no config files there)."""

    train_url: str
    validation_url: str | None
    train_rows: int
    validation_rows: int
    shape: tuple[int, int, int]
    num_classes: int
    mean: list[float]
    std: list[float]
    model: str
    model_options: dict[str, Any]
    optimizer: str
    learning_rate: float
    scale_lr: bool
    momentum: float
    schedule: str
    warmup_epochs: int
    epochs: int
    batch_size: int
    early_stopping_patience: int
    restore_best_weights: bool
    class_weights: tuple[float, ...]
    augment: bool
    shuffle_buffer: int
    cache_mb: int
    reader_threads: int
    seed: int
    bind_cores: bool
    mixed_precision: str
    checkpoint_dir: str
    tracking_uri: str
    run_id: str
    start_epoch: int = 0
    checkpoint: str = "ckpt"  # the checkpoint prefix (under checkpoint_dir) that start_epoch resumes from
    fp16_allreduce: bool = False
    history: list[dict[str, float]] = field(default_factory=list)


def steps_per_epoch(train_rows: int, batch_size: int, workers: int) -> int:
    """The same number of steps on every worker, from the manifest: one pass over the data in global batches."""
    return max(1, train_rows // (batch_size * workers))


def cache_shard(rows: int, workers: int, shape: tuple[int, int, int], cache_mb: int) -> bool:
    """Whether a worker's share of `rows` (training plus validation; raw uint8 pixels) fits the in-memory cache
    budget."""
    shard_bytes = math.ceil(rows / workers) * math.prod(shape)
    return cache_mb > 0 and shard_bytes <= cache_mb * 2**20


def cores_per_worker(cores: int, workers_here: int, bound: bool) -> int:
    """The cores one worker has to itself: all of its own group when bound, else an equal split of the machine's."""
    return max(1, cores if bound else cores // max(1, workers_here))


def reader_threads(configured: int, own_cores: int) -> int:
    """petastorm reader threads for one worker: as configured, or (0) the cores the worker has to itself."""
    return configured if configured > 0 else own_cores


def core_group(allowed: list[int], local_rank: int, local_size: int) -> list[int]:
    """This worker's share of the cores it may run on: near-equal contiguous groups by local rank, or one core
    shared round-robin when the workers on this machine outnumber its cores."""
    cores = sorted(allowed)
    if local_size <= 1:
        return cores
    if local_size > len(cores):
        return [cores[local_rank % len(cores)]]
    n = len(cores)
    return cores[local_rank * n // local_size:(local_rank + 1) * n // local_size]


def cpu_flags() -> set[str]:
    """The instruction-set flags of this machine's CPU (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def precision_policy(setting: str, has_gpu: bool, cpu_amx: bool) -> str:
    """The Keras dtype policy for `train.mixed_precision`. `auto`: float16 compute on a GPU, bfloat16 on a CPU with
    AMX (measured 1.7x float32's img/s), float32 elsewhere; `on`: float16 on a GPU, bfloat16 on any CPU (float16 is
    emulated on CPUs); `float16`/`bfloat16` as named; `off`: float32."""
    if setting in ("float16", "bfloat16"):
        return f"mixed_{setting}"
    if setting == "off" or (setting == "auto" and not has_gpu and not cpu_amx):
        return "float32"
    return "mixed_float16" if has_gpu else "mixed_bfloat16"


def policy_setting(policy: str) -> str:
    """The `train.mixed_precision` value that names one resolved policy on any machine."""
    return {"mixed_float16": "float16", "mixed_bfloat16": "bfloat16", "float32": "off"}[policy]


def _thread_ids() -> list[int]:
    return [int(tid) for tid in os.listdir("/proc/self/task")]


def bind_to_cores(cores: list[int]) -> None:
    """Restrict every thread of this process (and so every thread it starts later) to `cores`."""
    for tid in _thread_ids():
        try:
            os.sched_setaffinity(tid, cores)
        except OSError:  # a thread that ended meanwhile
            pass


def process_cores() -> list[int]:
    """Every core some thread of this process may run on."""
    cores: set[int] = set()
    for tid in _thread_ids():
        try:
            cores |= os.sched_getaffinity(tid)
        except OSError:  # a thread that ended meanwhile
            pass
    return sorted(cores)


def weights_digest(model) -> str:
    """A digest of every weight, to prove all ranks hold the same model."""
    h = hashlib.sha256()
    for w in model.get_weights():
        h.update(w.tobytes())
    return h.hexdigest()


def _setup_devices(tf, hvd, mixed_precision: str, bind_cores: bool) -> tuple[str, int]:
    """GPU pinning or CPU core split, and the dtype policy; returns (the policy's name, the number of cores this
    worker has to itself)."""
    cores = sorted(os.sched_getaffinity(0))
    if bind_cores:
        # Horovod: like `mpirun --bind-to core`, each worker on this machine keeps to its own cores, so workers do
        # not migrate between cores and evict each other's caches (measured: +5 to 12% img/s, 2 workers on 2 cores).
        cores = core_group(cores, hvd.local_rank(), hvd.local_size())
        bind_to_cores(cores)
    # Horovod: workers sharing one machine split its cores instead of each grabbing all of them.
    per_worker = cores_per_worker(len(cores), hvd.local_size(), bind_cores)
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        # Horovod: pin one GPU per worker, chosen by the worker's rank on this machine.
        tf.config.set_visible_devices(gpus[hvd.local_rank() % len(gpus)], "GPU")
        tf.config.experimental.set_memory_growth(gpus[hvd.local_rank() % len(gpus)], True)
    else:
        tf.config.threading.set_intra_op_parallelism_threads(per_worker)
        tf.config.threading.set_inter_op_parallelism_threads(2)
    flags = cpu_flags()
    policy = precision_policy(mixed_precision, bool(gpus), "amx_bf16" in flags)
    if policy == "mixed_bfloat16" and not gpus and not {"amx_bf16", "avx512_bf16"} & flags:
        print("train.mixed_precision: this CPU has no bfloat16 instructions (AMX, AVX512-BF16); bfloat16 will be "
              "emulated and slower than float32", file=sys.stderr)
    import tf_keras as keras

    keras.mixed_precision.set_global_policy(policy)
    return policy, per_worker


@dataclass
class BestEpoch:
    """The epoch with the lowest val_loss so far, and how many epochs have passed without an improvement."""
    epoch: int | None = None
    val_loss: float = math.inf
    stale: int = 0

    def observe(self, epoch: int, val_loss: float) -> bool:
        """Record an epoch's val_loss; True when it improves on the best by more than 1e-4."""
        if val_loss < self.val_loss - 1e-4:
            self.epoch, self.val_loss, self.stale = epoch, val_loss, 0
            return True
        self.stale += 1
        return False


def best_weights_file(directory: Path, epoch: int) -> Path:
    """Where rank 0 keeps the weights of the best epoch (0-based `epoch`), named by epoch so that the file always
    matches the history that names it, whenever a run was stopped."""
    return directory / f"best_weights_epoch{epoch + 1:04d}.h5"


def _save_best_weights(model, directory: Path, epoch: int) -> None:
    """The best epoch's weights, written atomically."""
    path = best_weights_file(directory, epoch)
    tmp = path.with_name(f"tmp_{path.name}")
    model.save_weights(str(tmp))
    os.replace(tmp, path)


def _remove_all_but(directory: Path, pattern: str, keep: str | None) -> None:
    """Remove the files matching `pattern` except those named `keep` or `keep.*` (an older epoch's checkpoint or
    best weights, once state.json names the newer ones)."""
    for f in directory.glob(pattern):
        if f.is_file() and not (keep and (f.name == keep or f.name.startswith(f"{keep}."))):
            f.unlink(missing_ok=True)


def _save_checkpoint(ckpt, directory: Path, state: dict[str, Any]) -> None:
    """Model + optimizer state under a new prefix per epoch, then the JSON that marks the epoch complete and names
    that prefix (written last, atomically), then the older prefixes go. Killed at any point, state.json and the
    checkpoint it names still belong together (one prefix rewritten in place could be half the next epoch)."""
    prefix = f"ckpt-{state['epoch']:04d}"
    ckpt.write(str(directory / prefix))
    tmp = directory / "state.json.tmp"
    tmp.write_text(json.dumps({**state, "checkpoint": prefix}))
    os.replace(tmp, directory / "state.json")
    _remove_all_but(directory, "ckpt*", prefix)


def read_state(directory: str | Path) -> dict[str, Any] | None:
    path = Path(directory) / "state.json"
    return json.loads(path.read_text()) if path.is_file() else None


def check_shared_paths(spec: WorkerSpec) -> None:
    """Fail with the paths and the host named when this executor cannot see the dataset or the run's checkpoint
    directory the driver prepared (a cluster whose executors do not share the driver's storage)."""
    import socket

    from pipelines.train.data import local_path

    splits = [local_path(url) for url in (spec.train_url, spec.validation_url) if url]
    wanted = [*(("the dataset (paths.datasets_root)", path) for path in splits if path),
              ("the run's checkpoint directory (paths.checkpoints_root)", Path(spec.checkpoint_dir))]
    missing = [f"{what} {path}" for what, path in wanted if not path.is_dir()]
    if missing:
        raise RuntimeError(f"executor host {socket.gethostname()} cannot see {'; '.join(missing)}: datasets and "
                           "checkpoints must be on storage that the driver and every executor share (NFS, /dbfs)")


def train_worker(spec: WorkerSpec) -> dict[str, Any]:
    """One Horovod worker: build, (restore,) train for the remaining epochs, return what the driver checks."""
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    import warnings

    warnings.filterwarnings("ignore")
    import horovod.tensorflow as hvd_tf
    import horovod.tensorflow.keras as hvd
    import numpy as np
    import tensorflow as tf
    import tf_keras as keras

    from pipelines.models import ModelOptions, build_model
    from pipelines.train.data import FeedOptions, ValidationFeed, split_dataset
    from pipelines.train.schedule import LearningRate, make_optimizer

    hvd.init()  # Horovod: join the other workers (Gloo rendezvous through the Spark driver)
    rank, size = hvd.rank(), hvd.size()
    check_shared_paths(spec)  # before the first collective: a worker missing its files fails here, clearly
    policy, own_cores = _setup_devices(tf, hvd, spec.mixed_precision, spec.bind_cores)
    tf.random.set_seed(spec.seed + rank)  # Horovod: different augmentation/dropout noise per worker

    def new_model():
        """The configured model, in the current global dtype policy."""
        return build_model(spec.model, spec.shape, spec.num_classes, spec.mean, spec.std,
                           ModelOptions(**spec.model_options))

    model = new_model()
    peak = spec.learning_rate * (size if spec.scale_lr else 1)  # Horovod: scale the rate with the global batch
    base = make_optimizer(spec.optimizer, spec.learning_rate, spec.momentum)
    # Horovod: wrap the optimizer so compute_gradients averages the gradients of all workers (allreduce).
    compression = hvd.Compression.fp16 if spec.fp16_allreduce else hvd.Compression.none
    opt = hvd.DistributedOptimizer(base, compression=compression)
    if policy == "mixed_float16":  # float16 gradients underflow without loss scaling; bfloat16 has float32's range
        opt = keras.mixed_precision.LossScaleOptimizer(opt)
    opt.build(model.trainable_variables)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(reduction="none")

    ckpt_dir = Path(spec.checkpoint_dir)
    ckpt = tf.train.Checkpoint(model=model, optimizer=opt)
    start_epoch, history = spec.start_epoch, list(spec.history)
    if start_epoch > 0:
        ckpt.read(str(ckpt_dir / spec.checkpoint)).expect_partial()  # every worker restores the same files
    # Horovod: start every worker from rank 0's weights and optimizer state.
    hvd_tf.broadcast_variables(model.variables, root_rank=0)
    hvd_tf.broadcast_variables(opt.variables, root_rank=0)

    steps = steps_per_epoch(spec.train_rows, spec.batch_size, size)
    lr = LearningRate(spec.learning_rate, peak, spec.schedule, spec.epochs, spec.warmup_epochs, steps)
    best = BestEpoch()
    for past in history:  # replay schedule and early-stopping state on resume
        if "val_loss" in past:
            lr.observe(past["val_loss"])
            best.observe(past["epoch"], past["val_loss"])

    @tf.function
    def train_step(x, y, w):
        with tf.GradientTape() as tape:
            probs = model(x, training=True)
            loss = tf.reduce_sum(loss_fn(y, probs) * w) / tf.cast(tf.shape(y)[0], tf.float32)
            if model.losses:
                loss += tf.add_n(model.losses)
        opt.minimize(loss, model.trainable_variables, tape=tape)  # Horovod: allreduce inside compute_gradients
        correct = tf.reduce_sum(tf.cast(tf.equal(tf.argmax(probs, -1, output_type=tf.int32), y), tf.float32))
        return loss, correct

    @tf.function
    def eval_step(x, y):
        probs = model(x, training=False)
        losses = keras.losses.sparse_categorical_crossentropy(y, probs)
        correct = tf.reduce_sum(tf.cast(tf.equal(tf.argmax(probs, -1, output_type=tf.int32), y), tf.float32))
        return tf.reduce_sum(losses), correct, tf.cast(tf.shape(y)[0], tf.float32)

    # Horovod: each worker reads shard `rank` of `size`; workers on one machine split its cores for reading too.
    feed = FeedOptions(spec.shape, spec.batch_size, rank, size, spec.seed + rank, spec.shuffle_buffer,
                       spec.augment, spec.class_weights,
                       reader_threads=reader_threads(spec.reader_threads, own_cores),
                       cache=cache_shard(spec.train_rows + spec.validation_rows, size, spec.shape, spec.cache_mb))
    steps_run = 0
    epochs_run = 0
    validation = ValidationFeed(spec.validation_url, feed) if spec.validation_url else None
    with split_dataset(spec.train_url, feed, endless=True) as train_ds:
        batches = iter(train_ds)
        for epoch in range(start_epoch, spec.epochs):
            t_epoch = time.perf_counter()
            waited = 0.0
            loss_sum = tf.constant(0.0)
            correct_sum = tf.constant(0.0)
            for step in range(steps):
                if epoch < spec.warmup_epochs or spec.schedule == "cosine" or step == 0:
                    opt.learning_rate.assign(lr.at(epoch, step))
                t0 = time.perf_counter()
                x, y, w = next(batches)
                waited += time.perf_counter() - t0
                loss, correct = train_step(x, y, w)
                loss_sum += loss
                correct_sum += correct
            seconds = time.perf_counter() - t_epoch
            steps_run += steps
            # Horovod: BatchNorm moving statistics are updated locally, not by the optimizer; average them so
            # every worker (and the saved model) holds the same statistics.
            for var in model.non_trainable_variables:
                if var.dtype.is_floating:
                    var.assign(hvd.allreduce(var, op=hvd.Average))
            # Horovod: average the epoch's metrics over all workers (MetricAverageCallback fails under tf-keras).
            loss_avg, acc_avg, wait_avg, sec_max = [float(v) for v in hvd.allreduce(
                tf.stack([loss_sum / steps, correct_sum / (steps * spec.batch_size), waited / seconds, seconds]),
                op=hvd.Average)]
            metrics = {"epoch": epoch, "loss": loss_avg, "accuracy": acc_avg,
                       "lr": float(lr.at(epoch, steps - 1)), "epoch_seconds": seconds,
                       "images_per_second": steps * spec.batch_size * size / seconds,
                       "input_wait_fraction": wait_avg}
            if validation is not None:
                totals = np.zeros(3)
                with validation.one_pass() as val_ds:
                    for x, y, _ in val_ds:
                        totals += np.array([t.numpy() for t in eval_step(x, y)])
                # Horovod: exact validation metrics: sum the shards' totals over all workers.
                v_loss, v_correct, v_n = hvd.allreduce(tf.constant(totals, tf.float64), op=hvd.Sum).numpy()
                if int(v_n) != spec.validation_rows:  # every worker sees the same sum, so all fail together
                    raise RuntimeError(f"validation read {int(v_n)} of {spec.validation_rows} rows in epoch {epoch}; "
                                       "refusing to report metrics on part of the split")
                metrics["val_loss"] = float(v_loss / max(v_n, 1))
                metrics["val_accuracy"] = float(v_correct / max(v_n, 1))
                lr.observe(metrics["val_loss"])
            history.append(metrics)
            epochs_run += 1
            improved = "val_loss" in metrics and best.observe(epoch, metrics["val_loss"])
            if rank == 0:  # Horovod: only rank 0 writes checkpoints and logs
                ckpt_dir.mkdir(parents=True, exist_ok=True)
                if improved:
                    _save_best_weights(model, ckpt_dir, epoch)
                _save_checkpoint(ckpt, ckpt_dir, {"epoch": epoch + 1, "history": history,
                                                        "precision": policy})
                _remove_all_but(ckpt_dir, "best_weights_epoch*.h5",
                                best_weights_file(ckpt_dir, best.epoch).name if best.epoch is not None else None)
                _log_epoch(spec, metrics)
                # Horovod forwards worker stdout to the driver in 64 KiB chunks, so progress goes through a
                # file on the (shared) checkpoint path that the driver tails.
                with open(ckpt_dir / PROGRESS_FILE, "a") as fh:
                    fh.write(json.dumps(metrics) + "\n")
            # identical on every worker (allreduced val_loss), so all stop together
            if spec.early_stopping_patience and best.stale >= spec.early_stopping_patience:
                break

    digest = weights_digest(model)
    result = {"rank": rank, "size": size, "steps": steps_run, "epochs_run": epochs_run,
              "weights_digest": digest, "precision": policy,
              "cores": process_cores()}  # after training, so the threads TF and petastorm started count too
    if rank == 0:  # Horovod: one copy of the final model, from rank 0
        model_path = ckpt_dir / "final_model.keras"
        served = model
        if policy != "float32":
            # the registered model computes in float32: the weights are float32 already, and evaluation and
            # batch inference run on CPU executors, where float16 is emulated
            keras.mixed_precision.set_global_policy("float32")
            served = new_model()
            served.set_weights(model.get_weights())
        registered_epoch = history[-1]["epoch"] if history else None
        if (spec.restore_best_weights and best.epoch is not None and best.epoch != registered_epoch
                and best_weights_file(ckpt_dir, best.epoch).exists()):  # absent: epochs trained by an older release
            served.load_weights(str(best_weights_file(ckpt_dir, best.epoch)))  # float32 whatever trained them
            registered_epoch = best.epoch
        served.save(str(model_path))
        result.update({"model_path": str(model_path), "history": history, "registered_epoch": registered_epoch})
    # Horovod: nobody leaves before everybody is done (rank 0 may still be saving). A scalar allreduce on the CPU, not
    # hvd.join(): a Horovod built with NCCL registers HorovodJoin for GPUs only, so join fails on CPU workers there.
    with tf.device("/cpu:0"):
        hvd_tf.allreduce(tf.zeros([]), name="sparkvision_done")
    return result


def _log_epoch(spec: WorkerSpec, metrics: dict[str, float]) -> None:
    """Per-epoch metrics to the driver's MLflow run, live (rank 0 only)."""
    try:
        from mlflow import MlflowClient
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        client = MlflowClient(tracking_uri=spec.tracking_uri)
        client.log_batch(spec.run_id, metrics=[Metric(k, float(v), now, int(metrics["epoch"]))
                                               for k, v in metrics.items() if k != "epoch"])
    except Exception as exc:  # tracking trouble must not kill training; the driver logs history again
        print(f"mlflow logging failed: {exc}", file=sys.stderr)


__all__ = ["WorkerSpec", "train_worker", "check_shared_paths", "steps_per_epoch", "precision_policy", "policy_setting",
           "cpu_flags", "cache_shard", "reader_threads", "cores_per_worker", "core_group", "bind_to_cores",
           "read_state", "BestEpoch", "best_weights_file", "PROGRESS_FILE"]
