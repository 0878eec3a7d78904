"""A training run's checkpoint directory (`<paths.checkpoints_root>/<run id>/`): the epoch checkpoints and the state
that marks an epoch complete, the best epoch's weights, the driver's lock, and whether a run can be resumed."""
from __future__ import annotations

import dataclasses
import json
import os
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from pipelines import tracking
from pipelines.config import Config, ConfigError, recipe_keys, resolve_path
from pipelines.dataset.contract import DatasetVersion
from pipelines.errors import PipelineError

STATE_FILE = "state.json"
PROGRESS_FILE = "progress.jsonl"  # one JSON line per completed epoch, tailed by the driver
WORKER_LOG = "workers.log"
FINAL_MODEL = "final_model.keras"


@dataclasses.dataclass(frozen=True)
class ResumeState:
    """What state.json records when an epoch is complete: a resume continues from here."""
    epoch: int = 0  # epochs completed
    checkpoint: str | None = None  # the prefix, under the checkpoint directory, of that epoch's checkpoint
    history: list[dict[str, float]] = dataclasses.field(default_factory=list)
    precision: str | None = None  # the resolved dtype policy it trained in


def checkpoint_dir(cfg: Config, run_id: str) -> Path:
    return resolve_path(cfg.paths.checkpoints_root) / run_id


def read_state(directory: str | Path) -> ResumeState | None:
    """The last completed epoch's state, or None before the first."""
    path = Path(directory) / STATE_FILE
    return ResumeState(**json.loads(path.read_text())) if path.is_file() else None


def save_checkpoint(ckpt: Any, directory: Path, state: ResumeState) -> None:
    """Model + optimizer state under a new prefix per epoch, then the JSON that marks the epoch complete and names
    that prefix (written last, atomically), then the older prefixes go. Killed at any point, state.json and the
    checkpoint it names still belong together (one prefix rewritten in place could be half the next epoch)."""
    prefix = f"ckpt-{state.epoch:04d}"
    ckpt.write(str(directory / prefix))
    tmp = directory / f"{STATE_FILE}.tmp"
    tmp.write_text(json.dumps(dataclasses.asdict(dataclasses.replace(state, checkpoint=prefix))))
    os.replace(tmp, directory / STATE_FILE)
    remove_all_but(directory, "ckpt*", prefix)


def best_weights_file(directory: Path, epoch: int) -> Path:
    """Where rank 0 keeps the weights of the best epoch (0-based `epoch`), named by epoch so that the file always
    matches the history that names it, whenever a run was stopped."""
    return directory / f"best_weights_epoch{epoch + 1:04d}.h5"


def save_best_weights(model: Any, directory: Path, epoch: int) -> None:
    """The best epoch's weights, written atomically."""
    path = best_weights_file(directory, epoch)
    tmp = path.with_name(f"tmp_{path.name}")
    model.save_weights(str(tmp))
    os.replace(tmp, path)


def keep_best_weights_of(directory: Path, epoch: int | None) -> None:
    """Remove every best-weights file but the one of `epoch`."""
    remove_all_but(directory, "best_weights_epoch*.h5", best_weights_file(directory, epoch).name
                   if epoch is not None else None)


def remove_all_but(directory: Path, pattern: str, keep: str | None) -> None:
    """Remove the files matching `pattern` except those named `keep` or `keep.*`."""
    for f in directory.glob(pattern):
        if f.is_file() and not (keep and (f.name == keep or f.name.startswith(f"{keep}."))):
            f.unlink(missing_ok=True)


def write_progress(directory: Path, metrics: dict[str, float]) -> None:
    """One completed epoch's metrics for the driver's epoch lines. Horovod forwards worker stdout to the driver in
    64 KiB chunks, so progress goes through a file on the (shared) checkpoint path that the driver tails."""
    with open(directory / PROGRESS_FILE, "a") as fh:
        fh.write(json.dumps(metrics) + "\n")


STEP_FILE = "step.json"  # rank 0's place in the epoch in flight, rewritten every few seconds, for progress


def write_step(directory: Path, epoch: int, step: int, steps: int, seconds: float) -> None:
    """Where rank 0 is in the current epoch (replaced atomically: the driver never reads half of it)."""
    tmp = directory / f"tmp_{STEP_FILE}"
    tmp.write_text(json.dumps({"epoch": epoch, "step": step, "steps": steps, "seconds": seconds}))
    os.replace(tmp, directory / STEP_FILE)


def read_step(directory: Path) -> dict[str, float] | None:
    try:
        return json.loads((directory / STEP_FILE).read_text())
    except (OSError, ValueError):
        return None


def check_shared_storage(split_urls: list[str | None], ckpt_dir: Path) -> None:
    """Fail, on an executor, when it cannot see the dataset's splits or the run's checkpoint directory."""
    from pipelines.train.data import local_path

    splits = [local_path(url) for url in split_urls if url]
    check_visible([*(("the dataset (paths.datasets_root)", path) for path in splits if path),
                   ("the run's checkpoint directory (paths.checkpoints_root)", ckpt_dir)])


def check_visible(folders: list[tuple[str, Path]]) -> None:
    """Fail naming the folders and the host when this executor cannot see what the driver prepared (a cluster whose
    executors do not share the driver's storage). `folders`: (what it is, the folder)."""
    missing = [f"{what} {path}" for what, path in folders if not path.is_dir()]
    if missing:
        raise RuntimeError(f"executor host {socket.gethostname()} cannot see {'; '.join(missing)}: datasets and "
                           "checkpoints must be on storage that the driver and every executor share (NFS, /dbfs)")


@contextmanager
def driver_lock(ckpt_dir: Path, run_id: str) -> Iterator[None]:
    """Held by the driver training `run_id` while it trains, so a second driver (a `--resume` of a run that is still
    training) is refused instead of writing the same checkpoints. The OS drops the lock when the driver dies, so a
    run whose driver was killed (out of memory, SIGKILL) still resumes. No guard where the file system has no locks."""
    import fcntl

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


def resume_state(cfg: Config, ds: DatasetVersion, run_id: str) -> tuple[ResumeState, list[tuple[str, str, str]]]:
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
    changed = changed_settings(previous.data.params, {**tracking.config_params(cfg, ("train",)), "dataset": ds.ref})
    check_same_recipe(run_id, changed)
    ckpt_dir = checkpoint_dir(cfg, run_id)
    state = read_state(ckpt_dir)
    if state is None:
        raise PipelineError(f"--resume {run_id}: no completed epoch checkpoint under {ckpt_dir}")
    if state.epoch >= cfg.train.epochs:
        raise PipelineError(f"--resume {run_id}: already trained {state.epoch} epochs; set train.epochs above "
                            f"{state.epoch} to train more")
    return state, changed


def changed_settings(recorded: dict[str, str], now: dict[str, str]) -> list[tuple[str, str, str]]:
    """(key, recorded value, value now) for every recorded MLflow param that differs now."""
    return [(k, recorded[k], now[k]) for k in sorted(now) if k in recorded and recorded[k] != now[k]]


def check_same_recipe(run_id: str, changed: list[tuple[str, str, str]]) -> None:
    """Refuse a resume that changes the recipe (the dataset, or a train.* key not marked resumable), naming the
    --set options that resume with the run's own settings."""
    recipe = [(k, was, new) for k, was, new in changed if k == "dataset" or k in recipe_keys()]
    if recipe:
        differ = ", ".join(f"{k} {was} (here {new})" for k, was, new in recipe)
        fix = " ".join(f"--set {'train.dataset' if k == 'dataset' else k}={_as_yaml(was)}" for k, was, _ in recipe)
        raise ConfigError(f"--resume {run_id}: the run was trained with {differ}; resume with the run's settings "
                          f"({fix}) or start a new run")


def _as_yaml(param: str) -> str:
    """An MLflow param string (Python's str of the value) as a --set value."""
    return {"True": "true", "False": "false", "None": "null"}.get(param, param)
