"""What a training run records in MLflow: its dataset input, live per-epoch metrics (from rank 0), every worker's
system metrics, the learning curve, the final metrics and the registered model."""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from pipelines import tracking
from pipelines.config import Config
from pipelines.console import hush
from pipelines.dataset.contract import DatasetVersion, Manifest
from pipelines.secrets import redacted_dict
from pipelines.train.timeline import StepBreakdown, breakdown, read_events

# What loading the model needs; listing them skips MLflow's inference, which imports the model in a fresh
# interpreter on every log (most of log_model's time) and leaves out tf-keras, which TensorFlow 2.16 needs for it.
MODEL_REQUIREMENTS = ("mlflow", "cloudpickle", "numpy", "tensorflow", "tf-keras")


def log_epoch(tracking_uri: str, run_id: str, metrics: dict[str, float]) -> None:
    """One epoch's metrics to the driver's run, live, at step = epoch (rank 0 only)."""
    try:
        from mlflow import MlflowClient
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        MlflowClient(tracking_uri=tracking_uri).log_batch(
            run_id, metrics=[Metric(k, float(v), now, int(metrics["epoch"])) for k, v in metrics.items() if k != "epoch"])
    except Exception as exc:
        # tracking trouble must not kill training: the epoch line, the learning curve and the final_* metrics still
        # come from the history the workers return to the driver
        print(f"mlflow logging failed: {exc}", file=sys.stderr)


class _NoMonitor:
    def finish(self) -> None:
        pass


def start_system_metrics(spec: Any, rank: int) -> Any:
    """This worker's CPU, memory, disk, network (and GPU) sampled into the run as node `rank<N>`, until finish()."""
    if spec.system_metrics_seconds <= 0:
        return _NoMonitor()
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(spec.run_id, sampling_interval=spec.system_metrics_seconds, node_id=f"rank{rank}",
                                   tracking_uri=spec.tracking_uri, resume_logging=spec.resume.epoch > 0)
    monitor.start()
    return monitor


def log_learning_curve(history: list[dict[str, float]]) -> None:
    """Loss and accuracy per epoch, training and validation, as learning_curve.png."""
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


def log_final(history: list[dict[str, float]], registered_epoch: int, precision: str) -> dict[str, float]:
    """Tags and final_* metrics of the registered weights' epoch (the last, or the best with
    train.restore_best_weights); returns that epoch's history entry."""
    import mlflow

    final = next(h for h in history if h["epoch"] == registered_epoch)
    mlflow.set_tags({"weights_in_sync": "true", "precision": precision, "registered_epoch": str(final["epoch"] + 1)})
    mlflow.log_metrics({f"final_{k}": v for k, v in final.items() if k != "epoch"})
    log_learning_curve(history)
    return final


def log_model(cfg: Config, model_path: str, manifest: Manifest) -> tuple[str, str]:
    """Log rank 0's model with its signature and pinned requirements; register it. Returns (model URI, version)."""
    import mlflow
    import numpy as np
    import tf_keras as keras
    from mlflow.models import infer_signature

    model = keras.models.load_model(model_path)
    # the signature from shapes and dtypes alone; no input example, whose check loads the model again and traces its
    # predict function (long for a backbone), for a zeros image that tells a reader nothing the signature does not.
    # The tests load and score the registered model instead.
    signature = infer_signature(np.zeros((1, *manifest.shape), np.uint8),
                                np.zeros((1, model.output_shape[-1]), np.float32))
    run_id = mlflow.active_run().info.run_id
    with hush():
        info = mlflow.tensorflow.log_model(model, name="model", signature=signature,
                                           pip_requirements=pinned_requirements(MODEL_REQUIREMENTS),
                                           metadata={"label_names": manifest.label_names,
                                                     "shape": list(manifest.shape)})
        version = mlflow.register_model(info.model_uri, cfg.mlflow.registered_model, tags={"run_id": run_id})
    return f"runs:/{run_id}/model", str(version.version)


def pinned_requirements(packages: tuple[str, ...]) -> list[str]:
    """`name==version` for each package, as installed here."""
    from importlib.metadata import version

    return [f"{name}=={version(name)}" for name in packages]


def log_start(cfg: Config, ds: DatasetVersion, manifest: Manifest, steps_per_epoch: int) -> None:
    """A new run's params: the config's train and spark sections, the dataset and the global batch."""
    import mlflow

    tracking.log_config(cfg, ("train", "spark"))
    mlflow.log_params({"dataset": ds.ref, "global_batch_size": cfg.train.batch_size * cfg.train.num_proc,
                       "steps_per_epoch": steps_per_epoch})
    tracking.log_dataset(ds, manifest, "training")


def log_resume(cfg: Config, start_epoch: int, changed: list[tuple[str, str, str]]) -> None:
    """A resume cannot change the run's params (its first settings): record what it changed instead."""
    import mlflow

    run = mlflow.active_run().info.run_id
    mlflow.set_tag(f"resumed_at_epoch_{start_epoch + 1}",
                   ", ".join(f"{k}: {old} -> {new}" for k, old, new in changed) or "no changes")
    error = mlflow.get_run(run).data.tags.get("error")
    if error:  # the error that stopped it belongs to its history now, not to the run that goes on
        mlflow.set_tag(f"error_before_epoch_{start_epoch + 1}", error)
        mlflow.MlflowClient().delete_tag(run, "error")
    mlflow.log_dict(redacted_dict(cfg.to_dict()), f"config_resumed_at_epoch_{start_epoch + 1}.yaml")


def log_timeline(path: Path) -> StepBreakdown | None:
    """train.horovod_timeline: rank 0's trace as the artifact horovod/horovod_timeline.json and its per-step
    breakdown as horovod_* metrics; the breakdown, None when there is no trace or no gradient allreduce in it (one
    worker)."""
    import mlflow

    if not path.is_file():
        return None
    mlflow.log_artifact(str(path), "horovod")
    steps = breakdown(read_events(path))
    if steps is not None:
        mlflow.log_metrics({"horovod_step_ms": steps.step_ms, "horovod_allreduce_ms": steps.allreduce_ms,
                            "horovod_tail_ms": steps.tail_ms})
    return steps
