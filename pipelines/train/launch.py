"""Starting the Horovod workers on Spark executors (`horovod.spark.run`): the task slots they need, their output,
the epoch lines printed while they train, and what to report when one fails or the job is stopped."""
from __future__ import annotations

import io
import json
import re
import sys
import threading
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from pyspark.sql import SparkSession

from pipelines.config import ConfigError, TrainConfig
from pipelines.console import say
from pipelines.environment import child_env, is_verbose
from pipelines.errors import PipelineError, first_line
from pipelines.signals import SignalWatch, Stopped
from pipelines.spark import local_cores
from pipelines.train import checkpoints as ck


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
_START_TIMEOUT = "Timed out waiting for Spark tasks to start"


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


def launch_failure(exc: BaseException, output: WorkerOutput, workers: int, start_timeout: int) -> str:
    """What stopped horovod.spark.run, in one line: too few task slots, or the failing worker's own exception."""
    if _START_TIMEOUT in str(exc):
        return (f"training could not start: Spark did not run {workers} tasks at once (one per Horovod worker) "
                f"within train.timeout_s={start_timeout}s: the cluster needs train.num_proc={workers} free task "
                f"slots; if its executors start on demand, raise train.timeout_s")
    cause = worker_exception(output, str(exc)) or f"{type(exc).__name__}: {first_line(exc)}"
    return f"training failed on a Horovod worker ({cause}); worker log: {output.path}"


def epoch_line(m: dict[str, float], total_epochs: int) -> str:
    """How one completed epoch reads on the terminal."""
    val = f", val_loss {m['val_loss']:.4f}, val_acc {m['val_accuracy']:.4f}" if "val_loss" in m else ""
    return (f"epoch {m['epoch'] + 1}/{total_epochs}: loss {m['loss']:.4f}, acc {m['accuracy']:.4f}{val}, "
            f"lr {m['lr']:.2e}, {m['images_per_second']:.0f} img/s, "
            f"input wait {100 * m['input_wait_fraction']:.1f}%, {m['epoch_seconds']:.1f}s")


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
                say("train", epoch_line(json.loads(line), self.total_epochs))

    def stop(self) -> None:
        self.done.set()
        self.join(timeout=5)


def check_task_slots(spark: SparkSession, workers: int) -> None:
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


def worker_process_env(t: TrainConfig, tracking_uri: str) -> dict[str, str]:
    """The environment of every Horovod worker process."""
    env = child_env(MLFLOW_TRACKING_URI=tracking_uri)
    if t.horovod_cycle_time_ms is not None:
        env["HOROVOD_CYCLE_TIME"] = f"{t.horovod_cycle_time_ms:g}"  # Horovod reads it in milliseconds
    return env


def run_workers(spark: SparkSession, worker_fn: Callable[[Any], dict], spec: Any, t: TrainConfig) -> list[dict]:
    """Run `worker_fn(spec)` on train.num_proc Horovod workers, one Spark task each, printing a line per epoch;
    their results by rank. A failing worker is reported by its own error; SIGTERM/SIGINT stop the workers and
    raise Stopped, saying how far the run got."""
    import horovod.spark

    ckpt_dir = Path(spec.checkpoint_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    out = WorkerOutput(ckpt_dir / ck.WORKER_LOG)
    printer = EpochPrinter(ckpt_dir / ck.PROGRESS_FILE, t.epochs)
    spark.sparkContext.setJobDescription("sparkvision train (horovod)")
    printer.start()
    try:
        with spark_thread_errors_to(out), SignalWatch() as signals:
            try:
                results = horovod.spark.run(worker_fn, args=(spec,), num_proc=t.num_proc,
                                            env=worker_process_env(t, spec.tracking_uri), stdout=out, stderr=out,
                                            verbose=2 if is_verbose() else 0, start_timeout=t.timeout_s,
                                            use_gloo=True)
            except Exception as exc:
                if not signals.received():
                    out.flush()
                    raise PipelineError(launch_failure(exc, out, t.num_proc, t.timeout_s)) from exc
            if signals.received():  # Horovod's own handlers stopped the workers; stop here too
                raise stopped(signals.received(), ckpt_dir, spec.run_id)
            return results
    finally:
        printer.stop()
        out.flush()


def stopped(signum: int, ckpt_dir: Path, run_id: str) -> Stopped:
    """The stop to raise once the workers are stopped, saying how far the run got and how to go on."""
    state = ck.read_state(ckpt_dir)
    done = state.epoch if state else 0
    return Stopped(signum, f"the workers were stopped after {done} completed epoch(s); continue with --resume "
                           f"{run_id}" if done else "the workers were stopped before the first epoch completed")
