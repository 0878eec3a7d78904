"""Surviving a lost worker: the driver relaunches the Horovod workers from the last completed epoch's checkpoint,
in the same MLflow run, up to train.max_restarts times, and records each restart."""
from __future__ import annotations

from typing import Any, Callable

from pyspark.sql import SparkSession

from pipelines.console import say
from pipelines.train import checkpoints as ck
from pipelines.train.launch import WorkerLost, run_workers
from pipelines.train.spec import WorkerSpec, worker_spec


def run_workers_restarting(spark: SparkSession, worker_fn: Callable[[WorkerSpec], dict],
                           spec: WorkerSpec) -> list[dict]:
    """`run_workers`, relaunched from the last completed epoch when a worker is lost (WorkerLost: killed, out of
    memory, its executor gone). An error raised by the training code fails at once: a relaunch would repeat it."""
    t, restarts = spec.train, 0
    while True:
        try:
            return run_workers(spark, worker_fn, spec, t)
        except WorkerLost as lost:
            if restarts >= t.max_restarts:
                raise WorkerLost(gave_up(str(lost), restarts, t.max_restarts, spec)) from lost
            restarts += 1
            state = ck.read_state(spec.checkpoint_dir) or spec.resume
            log_missing_epochs(spec, state.history)
            record_restart(restarts, state.epoch, str(lost))
            say("train", f"{short_cause(str(lost))}; restart {restarts} of {t.max_restarts} "
                         + (f"from the checkpoint of epoch {state.epoch}" if state.epoch else "from the start"))
            spec = worker_spec(spec.train, spec.data, spec.run_id, spec.tracking_uri, spec.checkpoint_dir, state,
                               spec.system_metrics_seconds)


def short_cause(message: str) -> str:
    """'worker rank 1 (...) was killed by SIGKILL' from WorkerLost's message, without the log's path."""
    return message.removeprefix("training lost a Horovod worker: ").split("; worker log:")[0]


def gave_up(message: str, restarts: int, max_restarts: int, spec: WorkerSpec) -> str:
    """The lost worker's message, saying how many restarts were spent and how to go on from the checkpoint."""
    state = ck.read_state(spec.checkpoint_dir)
    tail = f"; continue with --resume {spec.run_id}" if state and state.epoch else ""
    spent = f"after {restarts} restart(s), " if restarts else ""
    return f"{message} ({spent}train.max_restarts={max_restarts}){tail}"


def record_restart(number: int, epoch: int, cause: str) -> None:
    """On the active run: tag restart_N with the epoch it restarts from and why; metric `restarts` at that epoch."""
    import mlflow

    mlflow.set_tag(f"restart_{number}", f"from epoch {epoch + 1}: {short_cause(cause)}")
    mlflow.log_metric("restarts", number, step=epoch)


def log_missing_epochs(spec: WorkerSpec, history: list[dict[str, Any]]) -> None:
    """Epochs in `history` that the run has no metrics for, logged now: rank 0 checkpoints an epoch before it logs
    it (killed in between, the epoch is complete but unlogged), and its logging gives up while the tracking server
    is unreachable rather than stop training. So each epoch is logged exactly once."""
    from mlflow import MlflowClient

    from pipelines.train.mlflow_logging import log_epoch

    logged = {m.step for m in MlflowClient(tracking_uri=spec.tracking_uri).get_metric_history(spec.run_id, "loss")}
    for metrics in history:
        if int(metrics["epoch"]) not in logged:
            log_epoch(spec.tracking_uri, spec.run_id, metrics)
