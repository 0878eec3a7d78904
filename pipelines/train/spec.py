"""What the driver hands every Horovod worker: the frozen training config plus what only the driver knows (the
dataset's splits and statistics, the run, where its checkpoints go, the epoch a resume starts from). It pickles to
the executors, which read no config files."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from pipelines.config import TrainConfig
from pipelines.dataset.contract import DatasetVersion, Manifest
from pipelines.train.checkpoints import ResumeState
from pipelines.train.devices import policy_setting


@dataclass(frozen=True)
class TrainingData:
    """The published dataset version as training sees it (from its manifest)."""
    train_url: str
    validation_url: str | None
    train_rows: int
    validation_rows: int
    shape: tuple[int, int, int]
    num_classes: int
    mean: list[float]
    std: list[float]
    class_weights: tuple[float, ...]  # per class id; empty unless train.class_weights
    encoded: bool = False  # the image column holds JPEG/PNG files, decoded in the feed


@dataclass(frozen=True)
class WorkerSpec:
    train: TrainConfig
    data: TrainingData
    run_id: str
    tracking_uri: str
    checkpoint_dir: str
    resume: ResumeState = ResumeState()
    system_metrics_seconds: float = 0.0  # 0: no system metrics


def training_data(ds: DatasetVersion, manifest: Manifest, class_weights: bool) -> TrainingData:
    weights = manifest.class_weights
    return TrainingData(
        train_url=ds.split_path("train").as_uri(),
        validation_url=ds.split_path("validation").as_uri() if manifest.count("validation") else None,
        train_rows=manifest.count("train"), validation_rows=manifest.count("validation"),
        shape=tuple(manifest.shape), num_classes=manifest.num_classes, mean=manifest.mean, std=manifest.std,
        class_weights=tuple(weights[i] for i in range(manifest.num_classes)) if class_weights else (),
        encoded=manifest.encoded)


def worker_spec(train: TrainConfig, data: TrainingData, run_id: str, tracking_uri: str, checkpoint_dir: str,
                resume: ResumeState | None = None, system_metrics_seconds: float = 0.0) -> WorkerSpec:
    """The spec for a new run, or for a resume from `resume`. A resume keeps the checkpoint's precision: `auto` or
    `on` resolve differently on other hardware, and the recipe would change unseen."""
    resume = resume or ResumeState()
    if resume.precision:
        train = dataclasses.replace(train, mixed_precision=policy_setting(resume.precision))
    return WorkerSpec(train, data, run_id, tracking_uri, checkpoint_dir, resume, system_metrics_seconds)


def steps_per_epoch(train_rows: int, batch_size: int, workers: int) -> int:
    """The same number of steps on every worker, from the manifest: one pass over the data in global batches."""
    return max(1, train_rows // (batch_size * workers))
