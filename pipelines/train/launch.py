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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from pyspark.sql import SparkSession

from pipelines.config import ConfigError, TrainConfig
from pipelines.console import say
from pipelines.environment import child_env, is_verbose
from pipelines.errors import PipelineError, first_line
from pipelines.loopback import bind_horovod_to_loopback
from pipelines.progress import ProgressLine, progress_text
from pipelines.signals import SignalWatch, Stopped, signal_name
from pipelines.spark import local_cores, local_task_failures
from pipelines.train import checkpoints as ck
from pipelines.train.timeline import TIMELINE_FILE


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
_IDENTITY = re.compile(r"^sparkvision worker rank (\d+) of \d+ on (\S+) pid (\d+)$")  # train_worker's first line
_ENDED = re.compile(r"^(Killed|Aborted|Segmentation fault|Terminated)\b")  # the shell's line for a process that died
_SHUT_DOWN = "Horovod has been shut down"  # what the other workers' collectives raise once one worker has failed
_START_TIMEOUT = "Timed out waiting for Spark tasks to start"


class WorkerLost(PipelineError):
    """A Horovod worker died without an error of its own (killed, out of memory, its executor lost): training
    itself did not fail, so a relaunch from the last checkpoint can go on."""


@dataclass
class LaunchLog:
    """What this launch's part of the worker log says: each rank's last exception line, the ranks that only saw
    Horovod shut down (casualties, not causes), and where each rank ran."""
    last: dict[str, str] = field(default_factory=dict)
    casualties: set[str] = field(default_factory=set)
    where: dict[str, str] = field(default_factory=dict)
    died: list[str] = field(default_factory=list)


def read_launch_log(output: WorkerOutput) -> LaunchLog:
    """Parse this launch's lines of the worker log (earlier launches of a resumed run are skipped)."""
    seen, identity = LaunchLog(), {}
    with open(output.path, "rb") as fh:
        fh.seek(output.start)
        for raw in fh:
            line = _WORKER_LINE.match(raw.decode(errors="replace").rstrip())
            if not line:
                continue
            rank, text = line.groups()
            if _EXCEPTION.match(text):
                seen.last[rank] = text
            if _SHUT_DOWN in text:
                seen.casualties.add(rank)
            if who := _IDENTITY.match(text.strip()):
                seen.where[who.group(1)] = f"on {who.group(2)}, pid {who.group(3)}"
                identity[rank] = f"rank {who.group(1)} ({seen.where[who.group(1)]})"
            if ended := _ENDED.match(text.strip()):  # elastic mode forwards a process's lines when it ends
                seen.died.append(f"{identity.get(rank, 'a worker')}: {ended.group(1)}")
    return seen


def worker_exception(output: WorkerOutput, failure: str) -> str | None:
    """The exception that ended the failing worker: among the ranks that were not casualties, the one Horovod
    names as the first to exit (`Process name: N`), else the first in the log. None when no worker printed an
    exception, or when the rank Horovod names printed none (it died)."""
    seen = read_launch_log(output)
    causes = [rank for rank in seen.last if rank not in seen.casualties]
    named = re.search(r"Process name: (\d+)", failure)
    if named and named.group(1) not in seen.last and seen.last:
        return None  # the first to exit died without an exception; the others' errors are its casualties
    rank = named.group(1) if named and named.group(1) in causes else (causes or list(seen.last) or [None])[0]
    return seen.last[rank] if rank is not None else None


def how_it_died(output: WorkerOutput, exc: BaseException) -> str:
    """The worker Horovod names as the first to exit, and how: its rank, host and pid, signal or exit code."""
    failure = str(exc)
    named = re.search(r"Process name: (\d+)", failure)
    code = re.search(r"Exit code: (-?\d+)", failure)
    if not named:  # the elastic driver names no process: the workers whose lines end with how they died
        died = read_launch_log(output).died
        if not died:
            return f"a Horovod worker was lost ({type(exc).__name__}: {first_line(exc)})"
        return f"worker {died[0]}" + (f", then {len(died) - 1} more" if len(died) > 1 else "")
    rank = named.group(1)
    where = read_launch_log(output).where.get(rank, "")
    how = "exited"
    if code:
        n = int(code.group(1))
        signum = -n if n < 0 else n - 128 if n > 128 else 0
        how = f"was killed by {signal_name(signum)} (exit code {n})" if signum else f"exited with code {n}"
    return f"worker rank {rank} ({where}) {how}" if where else f"worker rank {rank} {how}"


def launch_failure(exc: BaseException, output: WorkerOutput, workers: int, start_timeout: int) -> PipelineError:
    """What stopped horovod.spark.run, in one line: too few task slots, the failing worker's own exception, or
    (WorkerLost) the worker that died and how."""
    if _START_TIMEOUT in str(exc):
        return PipelineError(
            f"training could not start: Spark did not run {workers} tasks at once (one per Horovod worker) within "
            f"train.timeout_s={start_timeout}s: the cluster needs train.num_proc={workers} free task slots; if its "
            f"executors start on demand, raise train.timeout_s")
    cause = worker_exception(output, str(exc))
    if cause is None:
        return WorkerLost(f"training lost a Horovod worker: {how_it_died(output, exc)}; worker log: "
                          f"{output.path}")
    return PipelineError(f"training failed on a Horovod worker ({cause}); worker log: {output.path}")


def epoch_line(m: dict[str, float], total_epochs: int, workers: int = 0) -> str:
    """How one completed epoch reads on the terminal (with the ring's size when it is not the `workers` asked)."""
    val = f", val_loss {m['val_loss']:.4f}, val_acc {m['val_accuracy']:.4f}" if "val_loss" in m else ""
    if workers and m.get("workers", workers) != workers:
        val += f", {int(m['workers'])} of {workers} workers"
    return (f"epoch {m['epoch'] + 1}/{total_epochs}: loss {m['loss']:.4f}, acc {m['accuracy']:.4f}{val}, "
            f"lr {m['lr']:.2e}, {m['images_per_second']:.0f} img/s, "
            f"input wait {100 * m['input_wait_fraction']:.1f}%, {m['epoch_seconds']:.1f}s")


class EpochPrinter(threading.Thread):
    """Tails rank 0's progress file and prints one line per epoch while the workers train."""

    def __init__(self, path: Path, total_epochs: int, workers: int = 0):
        super().__init__(daemon=True)
        self.path, self.total_epochs, self.workers = path, total_epochs, workers
        self.done = threading.Event()
        self._pos = path.stat().st_size if path.exists() else 0
        self.progress = ProgressLine("train")  # within a long epoch: steps done, rate, time left
        self._step_seen: dict | None = ck.read_step(path.parent)  # a resumed run's old one is not news

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
                self.progress.restart()
                say("train", epoch_line(json.loads(line), self.total_epochs, self.workers))
        self.show_step()

    def show_step(self) -> None:
        step = ck.read_step(self.path.parent)
        if step and step != self._step_seen and step["step"] < step["steps"]:
            self._step_seen = step
            self.progress.update(progress_text(f"epoch {int(step['epoch']) + 1}/{self.total_epochs}",
                                               int(step["step"]), int(step["steps"]), step["seconds"], "steps"))

    def stop(self) -> None:
        self.done.set()
        self.join(timeout=5)
        self.progress.clear()


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


def check_elastic_master(spark: SparkSession, t: TrainConfig) -> None:
    """Elastic mode brings a lost worker back through a Spark task retry, which a local master without F never
    makes: its first worker loss would fail the job."""
    master = spark.sparkContext.master
    if t.elastic and local_cores(master) and local_task_failures(master) == 1:
        raise ConfigError(f"train.elastic on spark.master {master} needs Spark task retries: use "
                          f"local[{local_cores(master)},{t.max_restarts + 1}] (local[N,F]: a task may fail F times)")


def worker_process_env(t: TrainConfig, tracking_uri: str, checkpoint_dir: str) -> dict[str, str]:
    """The environment of every Horovod worker process."""
    env = child_env(MLFLOW_TRACKING_URI=tracking_uri)
    if t.horovod_cycle_time_ms is not None:
        env["HOROVOD_CYCLE_TIME"] = f"{t.horovod_cycle_time_ms:g}"  # Horovod reads it in milliseconds
    if t.horovod_timeline:  # Horovod: rank 0 records every worker's collectives there (each launch starts it anew)
        env["HOROVOD_TIMELINE"] = str(Path(checkpoint_dir) / TIMELINE_FILE)
    if t.elastic:
        # Horovod: no response cache in elastic mode. With it, a worker that rejoins a ring whose survivor has been
        # training on disagrees with the survivor about the cached collectives, and Gloo aborts both
        # ("op.preamble.length <= op.nbytes"): every replacement died until the Spark task's retries ran out.
        env["HOROVOD_CACHE_CAPACITY"] = "0"
    return env


def run_workers(spark: SparkSession, worker_fn: Callable[[Any], dict], spec: Any, t: TrainConfig) -> list[dict]:
    """Run `worker_fn(spec)` on train.num_proc Horovod workers, one Spark task each, printing a line per epoch;
    their results by rank. A failing worker is reported by its own error; SIGTERM/SIGINT stop the workers and
    raise Stopped, saying how far the run got."""
    if local_cores(spark.sparkContext.master):
        bind_horovod_to_loopback()  # Horovod: its driver and rendezvous services, here on the loopback address only
    ckpt_dir = Path(spec.checkpoint_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    out = WorkerOutput(ckpt_dir / ck.WORKER_LOG)
    printer = EpochPrinter(ckpt_dir / ck.PROGRESS_FILE, t.epochs, t.num_proc)
    spark.sparkContext.setJobDescription("sparkvision train (horovod)")
    printer.start()
    try:
        with spark_thread_errors_to(out), quiet_elastic_task_retries(spark, t.elastic), SignalWatch() as signals:
            try:
                results = horovod_run(worker_fn, spec, t, out)
            except Exception as exc:
                if not signals.received():
                    out.flush()
                    raise launch_failure(exc, out, t.num_proc, t.timeout_s) from exc
            if signals.received():  # Horovod's own handlers stopped the workers; stop here too
                raise stopped(signals.received(), ckpt_dir, spec.run_id)
            return results
    finally:
        printer.stop()
        out.flush()


@contextmanager
def quiet_elastic_task_retries(spark: SparkSession, elastic: bool) -> Iterator[None]:
    """Elastic mode brings a lost worker back by failing its Spark task on purpose ("Command failed, making Spark task
    fail to restart the task"), which a local master's executor logs as an ERROR with a stack trace on the terminal.
    Quiet runs keep the executor's log to FATAL while the workers train; the worker log and --verbose still show
    it, and a run that fails still says why."""
    if not elastic or is_verbose() or not local_cores(spark.sparkContext.master):
        yield
        return
    jvm = spark.sparkContext._jvm
    configurator, level = jvm.org.apache.logging.log4j.core.config.Configurator, jvm.org.apache.logging.log4j.Level
    name = "org.apache.spark.executor.Executor"
    configurator.setLevel(name, level.FATAL)
    try:
        yield
    finally:
        configurator.setLevel(name, level.ERROR)


def horovod_run(worker_fn: Callable[[Any], dict], spec: Any, t: TrainConfig, out: WorkerOutput) -> list[dict]:
    """horovod.spark.run, or with train.elastic its elastic mode (Gloo): between elastic_min_workers and num_proc
    workers, each ring waiting up to timeout_s for its workers."""
    import horovod.spark

    common = dict(args=(spec,), num_proc=t.num_proc, env=worker_process_env(t, spec.tracking_uri, spec.checkpoint_dir),
                  stdout=out, stderr=out, verbose=2 if is_verbose() else 0, start_timeout=t.timeout_s)
    if t.elastic:
        return horovod.spark.run_elastic(worker_fn, min_num_proc=t.elastic_min_workers, max_num_proc=t.num_proc,
                                         elastic_timeout=t.timeout_s, **common)
    return horovod.spark.run(worker_fn, use_gloo=True, **common)


def stopped(signum: int, ckpt_dir: Path, run_id: str) -> Stopped:
    """The stop to raise once the workers are stopped, saying how far the run got and how to go on."""
    state = ck.read_state(ckpt_dir)
    done = state.epoch if state else 0
    return Stopped(signum, f"the workers were stopped after {done} completed epoch(s); continue with --resume "
                           f"{run_id}" if done else "the workers were stopped before the first epoch completed")
