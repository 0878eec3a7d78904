"""`sparkvision train`: the driver side. Checks the dataset and the cluster, owns the MLflow run, launches the
Horovod workers (launch.py), checks they finished in sync, then logs and registers the model."""
from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from pathlib import Path
from typing import Any, Callable

from pyspark.sql import SparkSession

from pipelines import tracking
from pipelines.config import TRANSFER_MODELS, Config, TrainConfig, dataset_ref, resolve_path
from pipelines.console import say
from pipelines.dataset.contract import DatasetVersion, Manifest, resolve_dataset
from pipelines.environment import TASK_RUN_FILE_VAR
from pipelines.errors import PipelineError
from pipelines.storage import check_writable
from pipelines.train import checkpoints as ck
from pipelines.train.launch import check_elastic_master, check_task_slots
from pipelines.train.mlflow_logging import log_final, log_model, log_resume, log_start, log_timeline
from pipelines.train.restarts import log_missing_epochs, run_workers_restarting
from pipelines.train.spec import WorkerSpec, steps_per_epoch, training_data, worker_spec
from pipelines.train.timeline import TIMELINE_FILE, describe
from pipelines.train.worker import train_worker


def run_train(spark: SparkSession, cfg: Config, resume: str | None = None,
              worker_fn: Callable[[WorkerSpec], dict] = train_worker) -> dict[str, Any]:
    """Train on the configured dataset with train.num_proc Horovod workers (or go on with run `resume` from its last
    completed epoch); return the run id, the model URI and the registered version."""
    started = time.perf_counter()
    ds = resolve_dataset(cfg.paths.datasets_root, dataset_ref(cfg))
    ds.check_files(("train", "validation"))
    check_writable(resolve_path(cfg.paths.checkpoints_root), "paths.checkpoints_root")
    manifest = ds.manifest()
    t = checked_backbone(cfg.train, manifest)
    check_task_slots(spark, t.num_proc)
    check_elastic_master(spark, t)
    check_shardable(ds, manifest, t.num_proc)
    tracking.configure(cfg)
    resume = resume or earlier_attempts_run(cfg)
    state, changed = ck.resume_state(cfg, ds, resume) if resume else (ck.ResumeState(), [])
    tags = {"num_workers": str(t.num_proc), "spark_master": spark.sparkContext.master, "dataset": ds.ref}
    with contextlib.ExitStack() as held:
        if resume:  # before the run is reopened: a run another driver is training now is refused as it is
            held.enter_context(ck.driver_lock(ck.checkpoint_dir(cfg, resume), resume))
        with tracking.run(cfg, "train", run_id=resume, tags=tags, run_name=f"train {t.model} {ds.ref}") as active:
            run_id = active.info.run_id
            if resume:
                log_resume(cfg, state.epoch, changed)
            else:
                held.enter_context(ck.driver_lock(ck.checkpoint_dir(cfg, run_id), run_id))
                remember_for_retries(run_id)
                log_start(cfg, ds, manifest, steps_per_epoch(manifest.count("train"), t.batch_size, t.num_proc))
            spec = worker_spec(t, training_data(ds, manifest, t.class_weights), run_id, tracking.tracking_uri(cfg),
                               str(ck.checkpoint_dir(cfg, run_id)), state, cfg.mlflow.system_metrics_seconds)
            say("train", f"{'resuming' if resume else 'starting'} run {run_id}: {t.model} on {ds.ref}, "
                         f"{t.num_proc} Horovod worker(s), epochs {state.epoch + 1}..{t.epochs}, "
                         f"batch {t.batch_size}/worker, {t.optimizer} lr {t.learning_rate:g}")
            results = run_workers_restarting(spark, worker_fn, spec)
            log_missing_epochs(spec, results[0]["history"])  # an epoch rank 0 could not log (the server was down)
            outcome = record_results(cfg, manifest, results)
            outcome["horovod_timeline"] = report_timeline(spec.checkpoint_dir) if t.horovod_timeline else None
    took = time.perf_counter() - started
    say("train", finished_line(cfg, run_id, outcome, took))
    return {"stage": "train", "run_id": run_id, "registered_model": cfg.mlflow.registered_model, "dataset": ds.ref,
            **outcome, "seconds": round(took, 1)}


def report_timeline(checkpoint_dir: str) -> dict[str, float] | None:
    """train.horovod_timeline: the trace logged, its per-step breakdown said and returned (None: nothing to break
    down, as with one worker)."""
    path = Path(checkpoint_dir) / TIMELINE_FILE
    steps = log_timeline(path)
    if steps is None:
        say("train", f"Horovod timeline: {path} (no gradient allreduce in it)" if path.is_file()
            else "Horovod timeline: the workers wrote none")
        return None
    say("train", f"{describe(steps)}; trace: {path}")
    return {**dataclasses.asdict(steps), "compute_ms": round(steps.compute_ms, 2)}


def checked_backbone(t: TrainConfig, manifest: Manifest) -> TrainConfig:
    """For a transfer-learning model: its input size and weights file checked here, the file's path made absolute
    for the executors; other models as they are."""
    if t.model not in TRANSFER_MODELS:
        return t
    from pipelines.models.backbones import check_backbone

    weights = str(resolve_path(t.pretrained_weights)) if t.pretrained_weights else None
    check_backbone(t.model, manifest.shape, weights)
    return dataclasses.replace(t, pretrained_weights=weights)


def earlier_attempts_run(cfg: Config) -> str | None:
    """In a workflow task's retry: the run an earlier attempt trained, when it has a completed epoch to go on from
    and epochs left; else None (a new run)."""
    path = os.environ.get(TASK_RUN_FILE_VAR)
    run_id = Path(path).read_text().strip() if path and Path(path).is_file() else ""
    state = ck.read_state(ck.checkpoint_dir(cfg, run_id)) if run_id else None
    if state is None or state.epoch >= cfg.train.epochs:
        return None
    say("train", f"the workflow task's earlier attempt trained run {run_id} to epoch {state.epoch}: going on with it")
    return run_id


def remember_for_retries(run_id: str) -> None:
    """In a workflow task: where its retries find this run (written atomically)."""
    path = os.environ.get(TASK_RUN_FILE_VAR)
    if path:
        tmp = Path(f"{path}.tmp")
        tmp.write_text(run_id)
        os.replace(tmp, path)


def check_shardable(ds: DatasetVersion, manifest: Manifest, workers: int) -> None:
    """Every worker needs a Parquet row group of each split to read, and there must be something to train on."""
    groups = manifest.data.get("parquet", {}).get("row_groups", {})
    for split in ("train", "validation"):
        n = groups.get(split)
        if manifest.count(split) and n is not None and n < workers:
            raise PipelineError(f"{ds.ref} {split} has {n} Parquet row groups, fewer than train.num_proc={workers}: "
                                f"re-ingest with a smaller ingest.row_group_rows")
    if manifest.count("train") == 0:
        raise PipelineError(f"{ds.ref} has an empty training split")


def record_results(cfg: Config, manifest: Manifest, results: list[dict]) -> dict[str, Any]:
    """Check the workers ended with the same weights after the same steps; log the registered weights' metrics and
    register the model. Returns what the job reports about the model."""
    digests = {r["weights_digest"] for r in results}
    steps = {r["steps"] for r in results}
    if len(digests) != 1 or len(steps) != 1:
        raise PipelineError(f"workers finished out of sync: weight digests {digests}, steps {steps}")
    chief = results[0]
    history = chief["history"]
    final = log_final(history, chief["registered_epoch"], chief["precision"])
    model_uri, version = log_model(cfg, chief["model_path"], manifest)
    return {"model_uri": model_uri, "version": version, "epochs_run": len(history), "workers": len(results),
            "steps_per_worker": chief["steps"], "weights_in_sync": True, "precision": chief["precision"],
            "weights_digest": chief["weights_digest"], "worker_cores": [r["cores"] for r in results],
            "registered_epoch": final["epoch"] + 1, "last_epoch": history[-1]["epoch"] + 1,
            "metrics": {k: v for k, v in final.items() if k != "epoch"}}


def finished_line(cfg: Config, run_id: str, outcome: dict[str, Any], took: float) -> str:
    """The run's last line: how long, in which precision, how well, and what was registered."""
    m = outcome["metrics"]
    val = f", val_accuracy {m['val_accuracy']:.4f}" if "val_accuracy" in m else ""
    if outcome["registered_epoch"] != outcome["last_epoch"]:
        val += f" (weights of epoch {outcome['registered_epoch']}, the lowest val_loss)"
    return (f"run {run_id} finished in {took:.0f}s ({outcome['precision']}){val}; registered "
            f"{cfg.mlflow.registered_model} version {outcome['version']}; UI: {tracking.ui_command(cfg)}")
