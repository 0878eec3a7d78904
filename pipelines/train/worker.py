"""The training function each Horovod worker runs inside a Spark task, like the `train_fn` of Horovod's Keras Spark
examples: lines marked `# Horovod:` are what distribution adds to an ordinary single-process Keras loop."""
from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

from pipelines.train import checkpoints as ck
from pipelines.train.devices import process_cores, reader_threads, setup_devices
from pipelines.train.losses import per_example_loss
from pipelines.train.mlflow_logging import start_system_metrics
from pipelines.train.spec import WorkerSpec, steps_per_epoch


def train_worker(spec: WorkerSpec) -> dict[str, Any]:
    """One Horovod worker: build, (restore,) train for the remaining epochs, return what the driver checks."""
    import horovod.tensorflow as hvd_tf
    import horovod.tensorflow.keras as hvd
    import tensorflow as tf

    t, data, ckpt_dir = spec.train, spec.data, Path(spec.checkpoint_dir)
    hvd.init()  # Horovod: join the other workers (Gloo rendezvous through the Spark driver)
    say_where(hvd.rank(), hvd.size())
    ck.check_shared_storage([data.train_url, data.validation_url], ckpt_dir)  # before the first collective
    monitor = start_system_metrics(spec, hvd.rank())  # Horovod: every worker's CPU and memory, by rank
    devices = setup_devices(hvd, t.mixed_precision, t.bind_cores)
    tf.random.set_seed(t.seed + hvd.rank())  # Horovod: different augmentation/dropout noise per worker

    model = new_model(spec)
    opt = distributed_optimizer(spec, devices.policy, model.trainable_variables, hvd)
    ckpt = tf.train.Checkpoint(model=model, optimizer=opt)
    if spec.resume.checkpoint:
        ckpt.read(str(ckpt_dir / spec.resume.checkpoint)).expect_partial()  # every worker restores the same files
    if t.elastic:  # Horovod: elastic mode, the ring re-formed around a lost or returning worker (elastic.py)
        from pipelines.train.elastic import train_elastic

        history, best, steps_run = train_elastic(spec, model, opt, ckpt, devices, hvd)
    else:
        # Horovod: start every worker from rank 0's weights and optimizer state.
        hvd_tf.broadcast_variables(model.variables, root_rank=0)
        hvd_tf.broadcast_variables(opt.variables, root_rank=0)
        history, best, steps_run = train_fixed(spec, model, opt, ckpt, devices, hvd)

    epochs_run = len(history) - len(spec.resume.history)
    result = {"rank": hvd.rank(), "size": hvd.size(), "steps": steps_run, "epochs_run": epochs_run,
              "weights_digest": weights_digest(model), "precision": devices.policy,
              "cores": process_cores()}  # after training, so the threads TF and petastorm started count too
    if hvd.rank() == 0:  # Horovod: one copy of the final model, from rank 0
        result.update(export_model(spec, model, history, best, devices.policy))
    # Horovod: nobody leaves before everybody is done (rank 0 may still be saving). A scalar allreduce on the CPU, not
    # hvd.join(): a Horovod built with NCCL registers HorovodJoin for GPUs only, so join fails on CPU workers there.
    with tf.device("/cpu:0"):
        hvd_tf.allreduce(tf.zeros([]), name="sparkvision_done")
    monitor.finish()
    return result


def train_fixed(spec: WorkerSpec, model, opt, ckpt, devices, hvd) -> tuple[list[dict], Any, int]:
    """The epochs left, on a fixed set of workers (a lost worker ends the launch; the driver may relaunch it):
    the run's history, its best epoch and the optimizer steps each worker ran."""
    from pipelines.train.data import split_dataset

    t, ckpt_dir = spec.train, Path(spec.checkpoint_dir)
    ring = Ring(spec, model, opt, devices, hvd, spec.resume.history)
    history = list(spec.resume.history)
    with split_dataset(spec.data.train_url, ring.feed, endless=True) as train_ds:
        batches = iter(train_ds)
        for epoch in range(spec.resume.epoch, t.epochs):
            ring.enter(epoch)
            metrics = train_epoch(ring.train_step, batches, opt, ring.lr, epoch, ring.steps, t, hvd,
                                  step_reporter(ckpt_dir) if hvd.rank() == 0 else None)
            improved = ring.finish_epoch(metrics, batches, epoch)
            history.append(metrics)
            if hvd.rank() == 0:  # Horovod: only rank 0 writes checkpoints and logs
                record_epoch(spec, ckpt, model, history, ring.best, improved, devices.policy)
            if ring.should_stop():
                break
    return history, ring.best, ring.steps * (len(history) - len(spec.resume.history))


class Ring:
    """What the current set of workers trains with, all set by its size: steps per epoch, learning rate and best
    epoch (replayed from `history`), the backbone's phases, the compiled steps and this worker's feed."""

    def __init__(self, spec: WorkerSpec, model, opt, devices, hvd, history: list[dict]):
        from pipelines.models import BACKBONES, BackbonePhases
        from pipelines.train.data import ValidationFeed
        from pipelines.train.schedule import BestEpoch

        t, data = spec.train, spec.data
        self.spec, self.model, self.opt, self.hvd = spec, model, opt, hvd
        self.steps = steps_per_epoch(data.train_rows, t.batch_size, hvd.size())
        self.phases = BackbonePhases(t.freeze_backbone_epochs, t.unfreeze_layers) if t.model in BACKBONES else None
        # Horovod: the rate scaled to this ring's size
        self.lr, self.best = learning_rate(t, self.steps, hvd.size(), self.phases is not None), BestEpoch()
        replay(history, self.lr, self.best)
        self.train_step, self.eval_step = compiled_steps(model, opt, per_example_loss(t, data.num_classes))
        self.feed = feed_options(spec, hvd, devices.own_cores)  # Horovod: each worker reads shard `rank` of `size`
        self.validation = ValidationFeed(data.validation_url, self.feed) if data.validation_url else None

    def enter(self, epoch: int) -> None:
        """A backbone's phase for `epoch`: the same on every worker, so the same variables are allreduced."""
        if self.phases and self.phases.enter(epoch):
            loss = per_example_loss(self.spec.train, self.spec.data.num_classes)
            self.train_step, self.eval_step = compiled_steps(self.model, self.opt, loss,
                                                             self.phases.variables(self.model))

    def finish_epoch(self, metrics: dict, batches, epoch: int) -> bool:
        """BatchNorm settled, validation added to `metrics`, the schedule and best epoch told; whether it improved."""
        t, data = self.spec.train, self.spec.data
        settle_batchnorm(self.model, batches, self.phases is not None and not t.pretrained_weights, self.hvd)
        if self.validation is not None:
            metrics.update(validate(self.eval_step, self.validation, data.validation_rows, epoch, self.hvd))
            self.lr.observe(metrics["val_loss"])
        return "val_loss" in metrics and self.best.observe(epoch, metrics["val_loss"])

    def should_stop(self) -> bool:
        """Early stopping: identical on every worker (allreduced val_loss), so all stop together."""
        patience = self.spec.train.early_stopping_patience
        return bool(patience and self.best.stale >= patience)


def say_where(rank: int, size: int) -> None:
    """One line in the worker log, so that the driver can say which host and process a worker that dies was."""
    import os
    import socket
    import sys

    print(f"sparkvision worker rank {rank} of {size} on {socket.gethostname()} pid {os.getpid()}", file=sys.stderr,
          flush=True)


def new_model(spec: WorkerSpec, pretrained: bool = True):
    """The configured model, in the current global dtype policy (a backbone from its pretrained weights file when
    `pretrained` and one is configured)."""
    from pipelines.models import ModelOptions, build_model

    t, d = spec.train, spec.data
    return build_model(t.model, d.shape, d.num_classes, d.mean, d.std,
                       ModelOptions(activation=t.activation, dropout=t.dropout, l2=t.l2, width=t.width,
                                    conv_blocks=t.conv_blocks, dense_layers=t.dense_layers,
                                    normalization=t.normalization,
                                    pretrained_weights=t.pretrained_weights if pretrained else None))


def distributed_optimizer(spec: WorkerSpec, policy: str, variables: list, hvd):
    """The configured optimizer, averaging gradients over all workers, built for `variables`."""
    import tf_keras as keras

    from pipelines.train.schedule import make_optimizer

    t = spec.train
    base = make_optimizer(t.optimizer, t.learning_rate, t.momentum)
    # Horovod: wrap the optimizer so compute_gradients averages the gradients of all workers (allreduce).
    compression = hvd.Compression.fp16 if t.fp16_allreduce else hvd.Compression.none
    opt = hvd.DistributedOptimizer(base, compression=compression)
    if policy == "mixed_float16":  # float16 gradients underflow without loss scaling; bfloat16 has float32's range
        opt = keras.mixed_precision.LossScaleOptimizer(opt)
    opt.build(variables)
    return opt


def learning_rate(t, steps: int, workers: int, backbone: bool):
    """The configured schedule; a backbone's rate drops to train.finetune_lr_factor once it is unfrozen."""
    from pipelines.train.schedule import LearningRate

    peak = t.learning_rate * (workers if t.scale_lr else 1)  # Horovod: scale the rate with the global batch
    return LearningRate(t.learning_rate, peak, t.schedule, t.epochs, t.warmup_epochs, steps,
                        finetune_from=t.freeze_backbone_epochs if backbone else 0,
                        finetune_factor=t.finetune_lr_factor)


def replay(history: list[dict[str, float]], lr, best) -> list[dict[str, float]]:
    """A resumed run's learning-rate schedule and early-stopping state, replayed from its history; a copy of it."""
    for past in history:
        if "val_loss" in past:
            lr.observe(past["val_loss"])
            best.observe(past["epoch"], past["val_loss"])
    return list(history)


def compiled_steps(model, opt, loss_fn, variables: list | None = None):
    """The training step (weighted `loss_fn`, one optimizer update of `variables`, by default all trainable ones)
    and the evaluation step (summed cross-entropy and hits, whatever loss trains)."""
    import tensorflow as tf
    import tf_keras as keras

    trained = variables if variables is not None else model.trainable_variables

    def hits(y, probs):
        return tf.reduce_sum(tf.cast(tf.equal(tf.argmax(probs, -1, output_type=tf.int32), y), tf.float32))

    @tf.function(autograph=False)  # nothing here branches on tensors; autograph would take seconds converting Keras
    def train_step(x, y, w):
        with tf.GradientTape() as tape:
            probs = model(x, training=True)
            loss = tf.reduce_sum(loss_fn(y, probs) * w) / tf.cast(tf.shape(y)[0], tf.float32)
            if model.losses:
                loss += tf.add_n(model.losses)
        opt.minimize(loss, trained, tape=tape)  # Horovod: allreduce inside compute_gradients
        return loss, hits(y, probs)

    @tf.function(autograph=False)
    def eval_step(x, y):
        probs = model(x, training=False)
        losses = keras.losses.sparse_categorical_crossentropy(y, probs)
        return tf.reduce_sum(losses), hits(y, probs), tf.cast(tf.shape(y)[0], tf.float32)

    return train_step, eval_step


def feed_options(spec: WorkerSpec, hvd, own_cores: int):
    """This worker's feed: its shard, its seed, and its share of the machine's cores for reading."""
    from pipelines.train.data import FeedOptions, cache_shard

    t, d = spec.train, spec.data
    return FeedOptions(d.shape, t.batch_size, hvd.rank(), hvd.size(), t.seed + hvd.rank(), t.shuffle_buffer,
                       t.augmentation if t.augment else None, d.class_weights, reader_threads=reader_threads(t.reader_threads, own_cores),
                       cache=cache_shard(d.train_rows + d.validation_rows, hvd.size(), d.shape, t.cache_mb),
                       encoded=d.encoded)


def step_reporter(ckpt_dir: Path, every_seconds: float = 2.0):
    """Rank 0: report(epoch, step, steps, seconds) writes its place in the epoch for the driver's progress line,
    at most every `every_seconds`."""
    last = [0.0]

    def report(epoch: int, step: int, steps: int, seconds: float) -> None:
        if seconds - last[0] >= every_seconds:
            last[0] = seconds
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            ck.write_step(ckpt_dir, epoch, step, steps, seconds)

    return report


def train_epoch(train_step, batches, opt, lr, epoch: int, steps: int, t, hvd, report=None, first_step: int = 0,
                after_step=None) -> dict[str, float]:
    """Steps `first_step`..`steps` of the epoch on every worker (`after_step(step)` after each); the epoch's metrics
    over those steps, averaged over all workers."""
    import tensorflow as tf

    started, waited = time.perf_counter(), 0.0
    loss_sum, correct_sum = tf.constant(0.0), tf.constant(0.0)
    for step in range(first_step, steps):
        if epoch < t.warmup_epochs or t.schedule == "cosine" or step == first_step:
            opt.learning_rate.assign(lr.at(epoch, step))
        t0 = time.perf_counter()
        x, y, w = next(batches)
        waited += time.perf_counter() - t0
        loss, correct = train_step(x, y, w)
        loss_sum += loss
        correct_sum += correct
        if report:
            report(epoch, step + 1, steps, time.perf_counter() - started)
        if after_step:
            after_step(step)
    seconds, run = time.perf_counter() - started, steps - first_step
    # Horovod: average the epoch's metrics over all workers (MetricAverageCallback fails under tf-keras).
    loss_avg, acc_avg, wait_avg = [float(v) for v in hvd.allreduce(
        tf.stack([loss_sum / run, correct_sum / (run * t.batch_size), waited / seconds]), op=hvd.Average)]
    return {"epoch": epoch, "loss": loss_avg, "accuracy": acc_avg, "lr": float(lr.at(epoch, steps - 1)),
            "epoch_seconds": seconds, "images_per_second": run * t.batch_size * hvd.size() / seconds,
            "input_wait_fraction": wait_avg, "workers": hvd.size()}


def settle_batchnorm(model, batches, recalibrate: bool, hvd) -> None:
    """After an epoch: (a backbone trained from scratch) its BatchNorm statistics recomputed, then every worker's
    averaged."""
    if recalibrate:
        recalibrate_batchnorm(model, batches)
    average_local_statistics(model, hvd)


def recalibrate_batchnorm(model, batches, n_batches: int = 5) -> None:
    """A deep backbone trained from scratch for tens of steps: its BatchNorm moving averages still mix statistics of
    weights long since changed, and validation in inference mode falls to chance (seen on a real photo run). Reset
    them to the plain average over `n_batches` training batches under the current weights ("precise BN")."""
    import tf_keras as keras

    norms = [layer for layer in model.get_layer("backbone").layers
             if isinstance(layer, keras.layers.BatchNormalization)]
    kept = [layer.momentum for layer in norms]
    for k in range(n_batches):
        for layer in norms:
            layer.momentum = k / (k + 1)  # a running mean of the k + 1 batches' statistics
        x, _, _ = next(batches)
        model(x, training=True)
    for layer, momentum in zip(norms, kept):
        layer.momentum = momentum


def average_local_statistics(model, hvd) -> None:
    """Horovod: BatchNorm moving statistics are updated locally, not by the optimizer; average them so every worker
    (and the saved model) holds the same statistics."""
    for var in model.non_trainable_variables:
        if var.dtype.is_floating and "moving_" in var.name:  # not a frozen layer's weights: they do not change
            var.assign(hvd.allreduce(var, op=hvd.Average))


def validate(eval_step, validation, expected_rows: int, epoch: int, hvd) -> dict[str, float]:
    """Exact loss and accuracy over the whole validation split: every worker scores its shard."""
    import numpy as np
    import tensorflow as tf

    totals = np.zeros(3)
    with validation.one_pass() as val_ds:
        for x, y, _ in val_ds:
            totals += np.array([t.numpy() for t in eval_step(x, y)])
    # Horovod: sum the shards' totals over all workers.
    v_loss, v_correct, v_n = hvd.allreduce(tf.constant(totals, tf.float64), op=hvd.Sum).numpy()
    if int(v_n) != expected_rows:  # every worker sees the same sum, so all fail together
        raise RuntimeError(f"validation read {int(v_n)} of {expected_rows} rows in epoch {epoch}; "
                           "refusing to report metrics on part of the split")
    return {"val_loss": float(v_loss / max(v_n, 1)), "val_accuracy": float(v_correct / max(v_n, 1))}


def record_epoch(spec: WorkerSpec, ckpt, model, history: list[dict[str, float]], best, improved: bool,
                 policy: str) -> None:
    """Rank 0, after each epoch: the best weights, the checkpoint, MLflow's live metrics, the driver's progress."""
    from pipelines.train.mlflow_logging import log_epoch

    ckpt_dir = Path(spec.checkpoint_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    epoch = history[-1]["epoch"]
    if improved:
        ck.save_best_weights(model, ckpt_dir, epoch)
    ck.save_checkpoint(ckpt, ckpt_dir, ck.ResumeState(epoch + 1, None, history, policy))
    ck.keep_best_weights_of(ckpt_dir, best.epoch)
    log_epoch(spec.tracking_uri, spec.run_id, history[-1])
    ck.write_progress(ckpt_dir, history[-1])


def export_model(spec: WorkerSpec, model, history: list[dict[str, float]], best, policy: str) -> dict[str, Any]:
    """Rank 0 saves the model to register: float32 compute whatever trained it (evaluation and batch inference run
    on CPU executors, where float16 is emulated), with the best epoch's weights under train.restore_best_weights."""
    import tf_keras as keras

    ckpt_dir = Path(spec.checkpoint_dir)
    served = model
    if policy != "float32":  # the weights are float32 already; the layers' compute dtype is not
        keras.mixed_precision.set_global_policy("float32")
        served = new_model(spec, pretrained=False)
        served.set_weights(model.get_weights())
    registered_epoch = history[-1]["epoch"] if history else None
    if spec.train.restore_best_weights and best.epoch is not None and best.epoch != registered_epoch:
        served.load_weights(str(ck.best_weights_file(ckpt_dir, best.epoch)))  # float32 whatever trained them
        registered_epoch = best.epoch
    model_path = ckpt_dir / ck.FINAL_MODEL
    served.save(str(model_path))
    return {"model_path": str(model_path), "history": history, "registered_epoch": registered_epoch}


def weights_digest(model) -> str:
    """A digest of every weight, to prove all ranks hold the same model."""
    h = hashlib.sha256()
    for w in model.get_weights():
        h.update(w.tobytes())
    return h.hexdigest()
