"""train.elastic: Horovod's elastic mode. The workers commit their state (weights, optimizer, place in the run) in
memory every train.elastic_commit_steps steps; when a worker is lost the others roll back to the last commit, form a
smaller ring and go on, and the worker Spark starts again in its place joins at the next commit."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from pipelines.train import checkpoints as ck
from pipelines.train.spec import WorkerSpec
from pipelines.train.worker import Ring, record_epoch, step_reporter, train_epoch


def train_elastic(spec: WorkerSpec, model, opt, ckpt, devices, hvd) -> tuple[list[dict], Any, int]:
    """The epochs left, on however many workers are there: the run's history, its best epoch and the optimizer
    steps the ring ran (the same on every worker, whenever it joined)."""
    # Horovod: what every worker must agree on after a change of ring, broadcast from rank 0 at each (re)start.
    state = hvd.elastic.TensorFlowKerasState(model, opt, epoch=spec.resume.epoch, images=0, steps_run=0,
                                             history=list(spec.resume.history))

    @hvd.elastic.run  # Horovod: on a lost worker restore the last commit, on a new one sync from rank 0; call again
    def train(state) -> tuple[list[dict], Any, int]:
        return epochs_from(state, spec, model, opt, ckpt, devices, hvd)

    return train(state)


def epochs_from(state, spec: WorkerSpec, model, opt, ckpt, devices, hvd) -> tuple[list[dict], Any, int]:
    """Train from the state's epoch and place in it with the current ring: its size sets the steps per epoch, the
    learning rate and each worker's shard."""
    from pipelines.train.data import split_dataset

    t = spec.train
    ring = Ring(spec, model, opt, devices, hvd, state.history)
    per_step = t.batch_size * hvd.size()
    announce(state, hvd.size(), hvd.rank(), per_step)
    with split_dataset(spec.data.train_url, ring.feed, endless=True) as train_ds:
        batches = iter(train_ds)
        while state.epoch < t.epochs:
            epoch = state.epoch
            ring.enter(epoch)
            first = min(state.images // per_step, ring.steps - 1)  # where the last commit left this epoch
            metrics = train_epoch(ring.train_step, batches, opt, ring.lr, epoch, ring.steps, t, hvd,
                                  step_reporter(Path(spec.checkpoint_dir)) if hvd.rank() == 0 else None,
                                  first_step=first, after_step=committer(state, ring.steps, per_step, t))
            improved = ring.finish_epoch(metrics, batches, epoch)
            end_epoch(state, spec, ckpt, model, metrics, ring.best, improved, devices.policy, hvd.rank())
            if ring.should_stop():
                break
    return state.history, ring.best, state.steps_run


def committer(state, steps: int, per_step: int, t):
    """after_step for train_epoch: count the step, and commit every train.elastic_commit_steps steps (not the
    epoch's last: its end commits with the epoch's metrics)."""

    def after_step(step: int) -> None:
        state.images += per_step
        state.steps_run += 1
        if (step + 1) % t.elastic_commit_steps == 0 and step + 1 < steps:
            state.commit()  # Horovod: keep this place in memory; raises here when the ring has changed

    return after_step


def end_epoch(state, spec: WorkerSpec, ckpt, model, metrics: dict, best, improved: bool, policy: str,
              rank: int) -> None:
    """The epoch into the state and (rank 0) the checkpoint and MLflow, then a commit. An epoch a rolled-back
    ring trains again is recorded once: the checkpoint already holds it."""
    history = state.history + [metrics]  # a new list: the last commit holds the old one
    if rank == 0 and not recorded(spec.checkpoint_dir, metrics["epoch"]):  # Horovod: only rank 0 writes and logs
        record_epoch(spec, ckpt, model, history, best, improved, policy)
    state.history, state.epoch, state.images = history, metrics["epoch"] + 1, 0
    state.commit()  # Horovod: the epoch is done for every worker of this ring


def recorded(ckpt_dir: str, epoch: int) -> bool:
    """Whether the run's checkpoint already holds `epoch` (recorded before a worker loss rolled the ring back)."""
    saved = ck.read_state(ckpt_dir)
    return bool(saved and saved.epoch > epoch)


def announce(state, size: int, rank: int, per_step: int) -> None:
    """One line in the worker log (rank 0) each time a ring forms: its size and where it starts."""
    if rank == 0:
        print(f"sparkvision elastic: {size} worker(s) from epoch {state.epoch + 1}, step "
              f"{state.images // per_step + 1}", file=sys.stderr, flush=True)
