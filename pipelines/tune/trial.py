"""One training of a study or an experiment, on an executor: the train worker's own code as a one-worker Horovod
world in a child process (a fresh TensorFlow each time, its own cores, killed with its Spark task), reporting
each epoch as it completes so the trial can be pruned."""
from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from pipelines.environment import child_env
from pipelines.train import checkpoints as ck
from pipelines.train.devices import core_group
from pipelines.train.spec import WorkerSpec

SPEC_FILE, RESULT_FILE, LOG_FILE = "trial_spec.json", "trial_result.json", "trial.log"
PR_SET_PDEATHSIG = 1


class TrialStopped(Exception):
    """`on_epoch` asked to stop the training (a pruned trial); carries the last epoch's metrics."""

    def __init__(self, metrics: dict[str, float]):
        self.metrics = metrics
        super().__init__(f"stopped after epoch {int(metrics['epoch']) + 1}")


@dataclass(frozen=True)
class Placement:
    """Which of this machine's cores a trial may use: slot `slot` of `slots` trials running here at once."""
    slot: int = 0
    slots: int = 1

    def cores(self) -> list[int] | None:
        if self.slots <= 1:
            return None
        return core_group(sorted(os.sched_getaffinity(0)), self.slot % self.slots, self.slots)


def train_in_child(spec: WorkerSpec, on_epoch: Callable[[dict[str, float]], bool], placement: Placement,
                   score_urls: dict[str, str] | None = None) -> dict[str, Any]:
    """Train `spec` in a child process; `on_epoch(metrics)` after each epoch returns True to stop it (TrialStopped).
    The worker's result, with `scores` (accuracy, recall per class) of the trained model on each of `score_urls`.
    Only the log and the result stay in the trial's folder: the study's output is a config, not these weights."""
    trial_dir = Path(spec.checkpoint_dir)
    trial_dir.mkdir(parents=True, exist_ok=True)
    (trial_dir / SPEC_FILE).write_text(json.dumps({"spec": spec_to_dict(spec), "score_urls": score_urls or {}}))
    cores = placement.cores()
    with open(trial_dir / LOG_FILE, "ab") as log:
        child = subprocess.Popen(
            [sys.executable, "-m", "pipelines.tune.trial_process", str(trial_dir)], stdout=log,
            stderr=subprocess.STDOUT, env=one_worker_env(spec.tracking_uri), preexec_fn=lambda: _child_setup(cores))
    try:
        follow_epochs(child, trial_dir / ck.PROGRESS_FILE, on_epoch)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        remove_weights(trial_dir)
    if child.returncode != 0:
        raise RuntimeError(child_error(trial_dir / LOG_FILE, child.returncode))
    return json.loads((trial_dir / RESULT_FILE).read_text())


def remove_weights(trial_dir: Path) -> None:
    """Everything but the log, the epochs and the result."""
    import shutil

    for path in trial_dir.iterdir():
        if path.name not in (LOG_FILE, RESULT_FILE, SPEC_FILE, ck.PROGRESS_FILE):
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def follow_epochs(child: subprocess.Popen, progress: Path, on_epoch: Callable[[dict[str, float]], bool]) -> None:
    """Hand each completed epoch to `on_epoch` until the child exits; stop the child when it says so."""
    seen = 0
    while True:
        done = child.poll() is not None
        lines = progress.read_text().splitlines() if progress.exists() else []
        for line in lines[seen:]:
            seen += 1
            metrics = json.loads(line)
            if on_epoch(metrics) and not done:
                raise TrialStopped(metrics)
        if done:
            return
        time.sleep(0.5)


def one_worker_env(tracking_uri: str) -> dict[str, str]:
    """The child's environment: no Horovod rendezvous variables, so hvd.init() makes a one-worker world."""
    env = child_env(MLFLOW_TRACKING_URI=tracking_uri)
    return {k: v for k, v in env.items() if not k.startswith(("HOROVOD_", "OMPI_", "PMI_"))}


def _child_setup(cores: list[int] | None) -> None:
    """In the child before it runs: die with the Spark task's Python worker, keep to this trial's cores."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if cores:
        os.sched_setaffinity(0, cores)


def child_error(log: Path, returncode: int) -> str:
    """The training's own error: the last exception line of its log."""
    lines = [l.strip() for l in log.read_text(errors="replace").splitlines() if l.strip()] if log.exists() else []
    errors = [l for l in lines if ("Error" in l or "Exception" in l) and not l.startswith(("File ", "Traceback"))]
    cause = errors[-1] if errors else (lines[-1] if lines else "no output")
    how = f"killed by {signal.Signals(-returncode).name}" if returncode < 0 else f"exit {returncode}"
    return f"training {how}: {cause[:500]} (log: {log})"


def spec_to_dict(spec: WorkerSpec) -> dict[str, Any]:
    import dataclasses

    return dataclasses.asdict(spec)


def spec_from_dict(data: dict[str, Any]) -> WorkerSpec:
    from pipelines.config import TrainConfig
    from pipelines.train.spec import TrainingData

    d = dict(data["data"])
    d["shape"], d["class_weights"] = tuple(d["shape"]), tuple(d["class_weights"])
    return WorkerSpec(train=TrainConfig(**data["train"]), data=TrainingData(**d), run_id=data["run_id"],
                      tracking_uri=data["tracking_uri"], checkpoint_dir=data["checkpoint_dir"],
                      resume=ck.ResumeState(**data["resume"]), system_metrics_seconds=data["system_metrics_seconds"])
