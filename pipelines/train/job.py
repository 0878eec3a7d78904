"""`sparkvision train`: the driver side. Owns the MLflow run, launches Horovod workers on Spark executors with
horovod.spark.run, checks they finished in sync, then logs and registers the model."""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import sys
import threading
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from pyspark.sql import SparkSession

from pipelines import tracking
from pipelines.config import Config, ConfigError, dataset_ref, resolve_path
from pipelines.console import hush, is_verbose, say
from pipelines.dataset.contract import DatasetVersion, Manifest, resolve_dataset
from pipelines.errors import PipelineError, first_line
from pipelines.signals import SignalWatch, Stopped
from pipelines.spark import local_cores
from pipelines.train.worker import (PROGRESS_FILE, WorkerSpec, policy_setting, read_state, steps_per_epoch,
                                    train_worker)


class WorkerOutput(io.TextIOBase):
    """Where Horovod forwards the workers' stdout/stderr: the run's log file (and the terminal with --verbose)."""

    def __init__(self, log_path: Path):
        self.path = log_path
        self.start = log_path.stat().st_size if log_path.exists() else 0  # where this launch's output begins
        self.log = open(log_path, "a", buffering=1)

    def write(self, text: str) -> int:
        self.log.write(text)
        if is_verbose():
            sys.stderr.write(text)
        return len(text)

    def flush(self) -> None:
        self.log.flush()


@contextmanager
def spark_thread_errors_to(out: WorkerOutput) -> Iterator[None]:
    """When a worker fails, Horovod's `run_spark` thread dies with the cancelled Spark job's Java stack trace (and
    its output forwarders with 'Pipe is closed' when the workers are stopped); the driver reports the worker's own
    error instead, so those traces go to the worker log (and stderr with --verbose)."""
    previous = threading.excepthook

    def hook(args: Any) -> None:
        if args.thread is not None and any(n in args.thread.name for n in ("run_spark", "prefix_connection")):
            out.write("".join(traceback.format_exception(args.exc_type, args.exc_value, args.exc_traceback)))
        else:
            previous(args)

    threading.excepthook = hook
    try:
        yield
    finally:
        threading.excepthook = previous


_WORKER_LINE = re.compile(r"^\[(\d+)\]<stderr>:(.*)$")  # how Horovod forwards a line of rank N's stderr
_EXCEPTION = re.compile(r"^[A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt)\b")  # a traceback's last line
_SHUT_DOWN = "Horovod has been shut down"  # what the other workers' collectives raise once one worker has failed


def worker_exception(output: WorkerOutput, failure: str) -> str | None:
    """The exception that ended the failing worker, from this launch's part of the worker log: the workers that
    only saw Horovod shut down are casualties, not the cause; among the rest, the one Horovod names as the first
    to exit (`Process name: N`), else the first in the log. None when no worker printed an exception."""
    last: dict[str, str] = {}  # rank -> its last exception line (a traceback ends with the outermost)
    casualties: set[str] = set()
    with open(output.path, "rb") as fh:
        fh.seek(output.start)
        for raw in fh:
            line = _WORKER_LINE.match(raw.decode(errors="replace").rstrip())
            if not line:
                continue
            rank, text = line.groups()
            if _EXCEPTION.match(text):
                last[rank] = text
            if _SHUT_DOWN in text:
                casualties.add(rank)
    causes = [rank for rank in last if rank not in casualties] or list(last)
    named = re.search(r"Process name: (\d+)", failure)
    rank = named.group(1) if named and named.group(1) in causes else (causes[0] if causes else None)
    return last[rank] if rank is not None else None


class EpochPrinter(threading.Thread):
    """Tails rank 0's progress file and prints one line per epoch while the workers train."""

    def __init__(self, path: Path, total_epochs: int):
        super().__init__(daemon=True)
        self.path, self.total_epochs = path, total_epochs
        self.done = threading.Event()
        self._pos = path.stat().st_size if path.exists() else 0

    def run(self) -> None:
        while not self.done.wait(1.0):
            self.poll()
        self.poll()

    def poll(self) -> None:
        if not self.path.exists():
            return
        with open(self.path) as fh:
            fh.seek(self._pos)
            for line in fh:
                if not line.endswith("\n"):
                    break
                self._pos += len(line.encode())
                m = json.loads(line)
                val = f", val_loss {m['val_loss']:.4f}, val_acc {m['val_accuracy']:.4f}" if "val_loss" in m else ""
                say("train", f"epoch {m['epoch'] + 1}/{self.total_epochs}: loss {m['loss']:.4f}, "
                             f"acc {m['accuracy']:.4f}{val}, lr {m['lr']:.2e}, {m['images_per_second']:.0f} img/s, "
                             f"input wait {100 * m['input_wait_fraction']:.1f}%, {m['epoch_seconds']:.1f}s")

    def stop(self) -> None:
        self.done.set()
        self.join(timeout=5)


def _check_shardable(ds: DatasetVersion, manifest: Manifest, workers: int) -> None:
    groups = manifest.data.get("parquet", {}).get("row_groups", {})
    for split in ("train", "validation"):
        n = groups.get(split)
        if manifest.count(split) and n is not None and n < workers:
            raise PipelineError(f"{ds.ref} {split} has {n} Parquet row groups, fewer than train.num_proc={workers}: "
                                f"re-ingest with a smaller ingest.row_group_rows")
    if manifest.count("train") == 0:
        raise PipelineError(f"{ds.ref} has an empty training split")


def _check_task_slots(spark: SparkSession, workers: int) -> None:
    """Horovod runs each worker in its own Spark task, all at once. A local master's slots are fixed, so too few is
    a config error now rather than a wait of train.timeout_s; a cluster may still be adding executors."""
    master = spark.sparkContext.master
    cores = local_cores(master)
    per_task = int(spark.sparkContext.getConf().get("spark.task.cpus", "1"))
    slots = cores // per_task
    if cores and workers > slots:
        raise ConfigError(f"train.num_proc={workers} needs {workers} Spark task slots at once (one per Horovod "
                          f"worker) and spark.master {master} has {slots}: set train.num_proc to at most {slots}, "
                          f"or spark.master to local[{workers * per_task}]")


@contextmanager
def driver_lock(ckpt_dir: Path, run_id: str) -> Iterator[None]:
    """Held by the driver training `run_id` while it trains, so a second driver (a `--resume` of a run that is still
    training) is refused instead of writing the same checkpoints. The OS drops the lock when the driver dies, so a
    run whose driver was killed (out of memory, SIGKILL) still resumes. No guard where the file system has no locks."""
    import fcntl
    import socket

    ckpt_dir.mkdir(parents=True, exist_ok=True)
    with open(ckpt_dir / "driver.lock", "a+") as fh:  # not inherited by the processes the driver starts
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            raise PipelineError(f"run {run_id} is being trained now by {holder}: let it finish or stop it, then "
                                f"resume") from None
        except OSError:  # a file system without locks
            pass
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {socket.gethostname()}")
        fh.flush()
        yield


_START_TIMEOUT = "Timed out waiting for Spark tasks to start"


def launch_failure(exc: BaseException, output: WorkerOutput, workers: int, start_timeout: int) -> str:
    """What stopped horovod.spark.run, in one line: too few task slots, or the failing worker's own exception."""
    if _START_TIMEOUT in str(exc):
        return (f"training could not start: Spark did not run {workers} tasks at once (one per Horovod worker) "
                f"within train.timeout_s={start_timeout}s: the cluster needs train.num_proc={workers} free task "
                f"slots; if its executors start on demand, raise train.timeout_s")
    cause = worker_exception(output, str(exc)) or f"{type(exc).__name__}: {first_line(exc)}"
    return f"training failed on a Horovod worker ({cause}); worker log: {output.path}"


def worker_spec(cfg: Config, ds: DatasetVersion, manifest: Manifest, run_id: str,
                state: dict[str, Any] | None = None) -> WorkerSpec:
    """What every worker needs; `state`: the checkpoint state a resume continues from."""
    t = cfg.train
    state = state or {}
    precision = state.get("precision")
    weights = manifest.class_weights
    return WorkerSpec(
        train_url=ds.split_path("train").as_uri(),
        validation_url=ds.split_path("validation").as_uri() if manifest.count("validation") else None,
        train_rows=manifest.count("train"), validation_rows=manifest.count("validation"), shape=manifest.shape,
        num_classes=manifest.num_classes,
        mean=manifest.mean, std=manifest.std, model=t.model,
        model_options={"activation": t.activation, "dropout": t.dropout, "l2": t.l2, "width": t.width},
        optimizer=t.optimizer, learning_rate=t.learning_rate, scale_lr=t.scale_lr, momentum=t.momentum,
        schedule=t.schedule, warmup_epochs=t.warmup_epochs, epochs=t.epochs, batch_size=t.batch_size,
        early_stopping_patience=t.early_stopping_patience, restore_best_weights=t.restore_best_weights,
        class_weights=tuple(weights[i] for i in range(manifest.num_classes)) if t.class_weights else (),
        augment=t.augment, shuffle_buffer=t.shuffle_buffer, cache_mb=t.cache_mb, reader_threads=t.reader_threads,
        seed=t.seed, bind_cores=t.bind_cores,
        # a resume keeps the checkpoint's precision: `auto` or `on` resolve differently on other hardware, and the
        # recipe would change unseen (the checkpoint itself restores either way: its variables are float32)
        mixed_precision=policy_setting(precision) if precision else t.mixed_precision, fp16_allreduce=t.fp16_allreduce,
        checkpoint_dir=str(resolve_path(cfg.paths.checkpoints_root) / run_id),
        tracking_uri=tracking.tracking_uri(cfg), run_id=run_id, start_epoch=state.get("epoch", 0),
        history=state.get("history", []), checkpoint=state.get("checkpoint", "ckpt"))  # "ckpt": older checkpoints


def _log_dataset(ds: DatasetVersion, manifest: Manifest) -> None:
    import mlflow
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.data.http_dataset_source import HTTPDatasetSource  # noqa: F401  (registers sources)
    from mlflow.data.dataset_source_registry import resolve_dataset_source

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "can be interpreted in multiple ways": both are local artifact sources
        source = resolve_dataset_source(ds.path.as_uri())
    dataset = MetaDataset(source=source, name=ds.ref, digest=manifest.digest.split(":")[-1][:36])
    counts = manifest.data["counts"]["splits"]
    mlflow.log_input(dataset, context="training",
                     tags={"train_rows": str(counts["train"]), "validation_rows": str(counts["validation"]),
                           "test_rows": str(counts["test"]), "shape": "x".join(map(str, manifest.shape))})


def _learning_curve(history: list[dict[str, float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] + 1 for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(epochs, [h["loss"] for h in history], "o-", label="train")
    b.plot(epochs, [h["accuracy"] for h in history], "o-", label="train")
    if all("val_loss" in h for h in history):
        a.plot(epochs, [h["val_loss"] for h in history], "o-", label="validation")
        b.plot(epochs, [h["val_accuracy"] for h in history], "o-", label="validation")
    a.set(title="loss", xlabel="epoch")
    b.set(title="accuracy", xlabel="epoch")
    a.legend(), b.legend()
    tracking.log_figure_png(fig, "learning_curve.png")


def _log_model(cfg: Config, model_path: str, manifest: Manifest) -> tuple[str, str]:
    """Log rank 0's model with signature and input example; register it. Returns (model URI, version)."""
    import mlflow
    import numpy as np
    import tf_keras as keras
    from mlflow.models import infer_signature

    model = keras.models.load_model(model_path)
    example = np.zeros((1, *manifest.shape), dtype=np.uint8)  # shape and dtype only: no pixels on the driver
    signature = infer_signature(example, model.predict(example, verbose=0))
    with hush():
        info = mlflow.tensorflow.log_model(model, name="model", signature=signature, input_example=example,
                                           metadata={"label_names": manifest.label_names,
                                                     "shape": list(manifest.shape)})
        version = mlflow.register_model(info.model_uri, cfg.mlflow.registered_model,
                                        tags={"run_id": mlflow.active_run().info.run_id})
    return f"runs:/{mlflow.active_run().info.run_id}/model", str(version.version)


# What a run trains: resuming with any of these different would continue another recipe, or load a checkpoint into
# a model or optimizer it does not fit. The rest of train.* (epochs, num_proc, the feed, timeouts) may change.
RECIPE_KEYS = ("dataset", *(f"train.{k}" for k in (
    "model", "activation", "dropout", "l2", "width", "batch_size", "optimizer", "learning_rate", "scale_lr",
    "momentum", "schedule", "warmup_epochs", "class_weights", "augment", "seed", "mixed_precision")))


def _resume_state(cfg: Config, ds: DatasetVersion, run_id: str) -> tuple[dict[str, Any], list[tuple[str, str, str]]]:
    """The checkpoint state to continue `run_id` from, and the (key, was, now) settings this resume changes.

    Every reason a resume cannot go on is found here, before the run is reopened, so a refused resume leaves the
    run as it was (a FINISHED run stays FINISHED)."""
    import mlflow

    try:
        previous = mlflow.get_run(run_id)
    except Exception:
        raise PipelineError(f"--resume {run_id}: no such MLflow run in {tracking.tracking_uri(cfg)}") from None
    stage = previous.data.tags.get("sparkvision.stage")
    if stage != "train":
        what = f"the {stage} stage's" if stage else "not a sparkvision"
        raise PipelineError(f"--resume {run_id}: not a training run ({what} run)")
    recorded = previous.data.params
    now = {**tracking.config_params(cfg, ("train",)), "dataset": ds.ref}
    changed = [(k, recorded[k], now[k]) for k in sorted(now) if k in recorded and recorded[k] != now[k]]
    recipe = [(k, was, new) for k, was, new in changed if k in RECIPE_KEYS]
    if recipe:
        differ = ", ".join(f"{k} {was} (here {new})" for k, was, new in recipe)
        fix = " ".join(f"--set {'train.dataset' if k == 'dataset' else k}={_as_yaml(was)}" for k, was, _ in recipe)
        raise ConfigError(f"--resume {run_id}: the run was trained with {differ}; resume with the run's settings "
                          f"({fix}) or start a new run")
    ckpt_dir = resolve_path(cfg.paths.checkpoints_root) / run_id
    state = read_state(ckpt_dir)
    if state is None:
        raise PipelineError(f"--resume {run_id}: no completed epoch checkpoint under {ckpt_dir}")
    if state["epoch"] >= cfg.train.epochs:
        raise PipelineError(f"--resume {run_id}: already trained {state['epoch']} epochs; set train.epochs above "
                            f"{state['epoch']} to train more")
    return state, changed


def _as_yaml(param: str) -> str:
    """An MLflow param string (Python's str of the value) as a --set value."""
    return {"True": "true", "False": "false", "None": "null"}.get(param, param)


def run_train(spark: SparkSession, cfg: Config, resume: str | None = None,
              worker_fn: Callable[[WorkerSpec], dict] = train_worker) -> dict[str, Any]:
    """Train on the configured dataset with train.num_proc Horovod workers; return run id, model URI, version."""
    import horovod.spark

    started = time.perf_counter()
    ds = resolve_dataset(cfg.paths.datasets_root, dataset_ref(cfg))
    manifest = ds.manifest()
    t = cfg.train
    _check_task_slots(spark, t.num_proc)
    _check_shardable(ds, manifest, t.num_proc)
    tracking.configure(cfg)
    state, changed = _resume_state(cfg, ds, resume) if resume else (None, [])
    tags = {"num_workers": str(t.num_proc), "spark_master": spark.sparkContext.master, "dataset": ds.ref}
    with contextlib.ExitStack() as held:
        if resume:  # before the run is reopened: a run another driver is training now is refused as it is
            held.enter_context(driver_lock(resolve_path(cfg.paths.checkpoints_root) / resume, resume))
        with tracking.run(cfg, "train", run_id=resume, tags=tags) as active:
            import mlflow

            run_id = active.info.run_id
            ckpt_dir = resolve_path(cfg.paths.checkpoints_root) / run_id
            start_epoch = state["epoch"] if state else 0
            if not resume:
                held.enter_context(driver_lock(ckpt_dir, run_id))
                tracking.log_config(cfg, ("train", "spark"))
                epoch_steps = steps_per_epoch(manifest.count("train"), t.batch_size, t.num_proc)
                mlflow.log_params({"dataset": ds.ref, "global_batch_size": t.batch_size * t.num_proc,
                                   "steps_per_epoch": epoch_steps})
                _log_dataset(ds, manifest)
            else:  # params are the run's first settings and cannot change: record what this resume changed
                mlflow.set_tag(f"resumed_at_epoch_{start_epoch + 1}",
                               ", ".join(f"{k}: {old} -> {new}" for k, old, new in changed) or "no changes")
                mlflow.log_dict(cfg.to_dict(), f"config_resumed_at_epoch_{start_epoch + 1}.yaml")
            spec = worker_spec(cfg, ds, manifest, run_id, state)
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            out = WorkerOutput(ckpt_dir / "workers.log")
            printer = EpochPrinter(ckpt_dir / PROGRESS_FILE, t.epochs)
            say("train", f"{'resuming' if resume else 'starting'} run {run_id}: {t.model} on {ds.ref}, "
                         f"{t.num_proc} Horovod worker(s), epochs {start_epoch + 1}..{t.epochs}, "
                         f"batch {t.batch_size}/worker, {t.optimizer} lr {t.learning_rate:g}")
            env = {**os.environ, "TF_USE_LEGACY_KERAS": "1", "PYTHONWARNINGS": "ignore",
                   "TF_CPP_MIN_LOG_LEVEL": "0" if is_verbose() else "3",
                   "MLFLOW_TRACKING_URI": tracking.tracking_uri(cfg)}
            if t.horovod_cycle_time_ms is not None:
                env["HOROVOD_CYCLE_TIME"] = f"{t.horovod_cycle_time_ms:g}"  # Horovod reads it in milliseconds
            spark.sparkContext.setJobDescription("sparkvision train (horovod)")
            printer.start()
            try:
                with spark_thread_errors_to(out), SignalWatch() as signals:
                    try:
                        results = horovod.spark.run(worker_fn, args=(spec,), num_proc=t.num_proc, env=env, stdout=out,
                                                    stderr=out, verbose=2 if is_verbose() else 0,
                                                    start_timeout=t.timeout_s, use_gloo=True)
                    except Exception as exc:
                        if not signals.received():
                            out.flush()
                            raise PipelineError(launch_failure(exc, out, t.num_proc, t.timeout_s)) from exc
                    signum = signals.received()
                    if signum:  # Horovod's own handlers stopped the workers; stop here too
                        done = (read_state(ckpt_dir) or {}).get("epoch", 0)
                        raise Stopped(signum, f"the workers were stopped after {done} completed epoch(s); continue "
                                              f"with --resume {run_id}" if done else
                                      "the workers were stopped before the first epoch completed")
            finally:
                printer.stop()
                out.flush()
            digests = {r["weights_digest"] for r in results}
            steps = {r["steps"] for r in results}
            if len(digests) != 1 or len(steps) != 1:
                raise PipelineError(f"workers finished out of sync: weight digests {digests}, steps {steps}")
            chief = results[0]
            history = chief["history"]
            mlflow.set_tags({"weights_in_sync": "true", "precision": chief["precision"]})
            # the registered weights' epoch: the last, or with train.restore_best_weights the lowest val_loss
            final = next(h for h in history if h["epoch"] == chief["registered_epoch"])
            mlflow.set_tag("registered_epoch", str(final["epoch"] + 1))
            mlflow.log_metrics({f"final_{k}": v for k, v in final.items() if k != "epoch"})
            _learning_curve(history)
            model_uri, version = _log_model(cfg, chief["model_path"], manifest)
    took = time.perf_counter() - started
    val = f", val_accuracy {final['val_accuracy']:.4f}" if "val_accuracy" in final else ""
    if final is not history[-1]:
        val += f" (weights of epoch {final['epoch'] + 1}, the lowest val_loss)"
    say("train", f"run {run_id} finished in {took:.0f}s ({chief['precision']}){val}; "
                 f"registered {cfg.mlflow.registered_model} version {version}; UI: {tracking.ui_command(cfg)}")
    return {"stage": "train", "run_id": run_id, "model_uri": model_uri, "registered_model": cfg.mlflow.registered_model,
            "version": version, "dataset": ds.ref, "epochs_run": len(history), "workers": len(results),
            "steps_per_worker": chief["steps"], "weights_in_sync": True, "precision": chief["precision"],
            "weights_digest": chief["weights_digest"],
            "worker_cores": [r["cores"] for r in results], "registered_epoch": final["epoch"] + 1,
            "metrics": {k: v for k, v in final.items() if k != "epoch"}, "seconds": round(took, 1)}
