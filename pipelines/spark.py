"""The one place a SparkSession is built from config."""
from __future__ import annotations

import contextlib
import os
import re
import sys
import threading
import time
from typing import Callable, Iterator, TypeVar
from pathlib import Path

from pyspark.sql import SparkSession

from pipelines.config import Config, resolve_path
from pipelines.environment import is_verbose, worker_env
from pipelines.loopback import LOOPBACK_VAR
from pipelines.signals import keep_stop_handlers, on_stop, stop_requested


# Spark's logging, errors only, for a JVM this process starts; spark-submit starts its JVM before the job's code runs,
# so it takes the same option as `--driver-java-options` (the workflow runner passes it).
QUIET_LOG4J_OPTION = f"-Dlog4j.configurationFile={Path(__file__).with_name('log4j2.properties').as_uri()}"


def spark_conf(cfg: Config) -> dict[str, str]:
    """Spark settings derived from config: memory, Arrow, petastorm's cache, executor environment, driver JVM
    options."""
    conf = {
        "spark.driver.memory": cfg.spark.driver_memory,
        "spark.executor.memory": cfg.spark.executor_memory,
        "spark.sql.shuffle.partitions": str(cfg.spark.shuffle_partitions),
        "spark.sql.execution.arrow.pyspark.enabled": "true",
        "spark.sql.execution.arrow.maxRecordsPerBatch": str(cfg.spark.arrow_batch_size),
        "spark.ui.showConsoleProgress": "false",
        "spark.ui.enabled": "false" if cfg.spark.master.startswith("local") else "true",
        "spark.driver.bindAddress": "127.0.0.1" if cfg.spark.master.startswith("local") else "0.0.0.0",
        # The executors run the interpreter the job runs in (the project's venv), unless told otherwise.
        "spark.pyspark.python": os.environ.get("PYSPARK_PYTHON", sys.executable),
    }
    if cfg.spark.master.startswith("local"):
        conf["spark.driver.host"] = "127.0.0.1"
        conf["spark.python.daemon.module"] = "pipelines.executor_daemon"  # loopback Horovod, quiet stops
        conf[f"spark.executorEnv.{LOOPBACK_VAR}"] = "1"
    for key, value in worker_env().items():
        conf[f"spark.executorEnv.{key}"] = value
    slots = local_cores(cfg.spark.master)
    if slots:  # local[N]: N Python workers share this machine's cores
        conf["spark.executorEnv.SPARKVISION_TF_THREADS"] = str(max(1, (os.cpu_count() or 1) // slots))
    conf.update(cfg.spark.extra_conf)
    java_options = driver_java_options(cfg, is_verbose())
    if java_options:
        conf["spark.driver.extraJavaOptions"] = java_options
    return conf


def driver_java_options(cfg: Config, verbose: bool) -> str:
    """The driver JVM's options: spark.driver_java_options, spark.extra_conf's spark.driver.extraJavaOptions, and
    quiet logging unless verbose (beside the configured options, not instead of them)."""
    own = [cfg.spark.driver_java_options, cfg.spark.extra_conf.get("spark.driver.extraJavaOptions", "")]
    return " ".join(filter(None, [*own, "" if verbose else QUIET_LOG4J_OPTION]))


def local_cores(master: str) -> int:
    """N for local[N] (this machine's cores for local[*]), 0 for a cluster master."""
    m = re.fullmatch(r"local(?:\[(\d+|\*)(?:,\d+)?\])?", master)
    if not m:
        return 0
    if m.group(1) is None:
        return 1
    return (os.cpu_count() or 1) if m.group(1) == "*" else int(m.group(1))


def local_task_failures(master: str) -> int:
    """F for local[N,F]: how many times a task may fail (1 = never retried, a local master's default)."""
    m = re.fullmatch(r"local\[(?:\d+|\*),(\d+)\]", master)
    return int(m.group(1)) if m else 1


def master_url(cfg: Config) -> str:
    """spark.master, with task retries on a local master for elastic training: Horovod's elastic mode brings a lost
    worker back by failing its Spark task so that Spark runs it again."""
    master = cfg.spark.master
    if cfg.train.elastic and local_cores(master) and local_task_failures(master) == 1 and master.startswith("local["):
        return f"{master[:-1]},{cfg.train.max_restarts + 1}]"
    return master


def get_spark(cfg: Config) -> SparkSession:
    """The job's SparkSession: an active one (spark-submit, Databricks) gets our settings where it still can."""
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    builder = SparkSession.builder.appName(cfg.spark.app_name)
    # Under spark-submit (which sets PYSPARK_GATEWAY_PORT) its --master decides; otherwise the config does.
    if cfg.spark.master != "databricks" and "PYSPARK_GATEWAY_PORT" not in os.environ:
        builder = builder.master(master_url(cfg))
    for key, value in spark_conf(cfg).items():
        builder = builder.config(key, value)
    with keep_stop_handlers():  # the job's Ctrl-C handling, not PySpark's
        spark = builder.getOrCreate()
    cancel_jobs_on_stop(spark)  # as PySpark's own Ctrl-C handler did
    # petastorm reads its cache location from the session conf (not a Spark key: set after start).
    cache_dir = resolve_path(cfg.paths.datasets_root).parent / "petastorm-cache"
    spark.conf.set("petastorm.spark.converter.parentCacheDirUrl", cache_dir.as_uri())
    # WARN with --verbose; errors only by default, so a run prints one line per stage.
    spark.sparkContext.setLogLevel("WARN" if is_verbose() else "ERROR")
    return spark


def cancel_jobs_on_stop(spark: SparkSession) -> None:
    """When a stop signal arrives, cancel this session's Spark jobs (one canceller per process, whoever asks)."""
    on_stop("cancel Spark jobs", lambda: cancel_jobs_until_stopped(spark))


def cancel_jobs_until_stopped(spark: SparkSession, every_s: float = 0.5) -> None:
    """After a stop signal: cancel Spark's jobs now and every `every_s` until the SparkContext is stopped (then the
    call fails, which ends the loop) or the process exits.

    Once is not enough: a signal that arrives while the driver is still planning a job (a loaded machine takes seconds)
    finds nothing to cancel, and the job then runs to its end, with the main thread waiting on it inside the py4j call
    the signal interrupted."""
    while True:
        spark.sparkContext.cancelAllJobs()
        time.sleep(every_s)


@contextlib.contextmanager
def wind_down_on_stop(spark: SparkSession, wait_s: float = 5.0) -> Iterator[None]:
    """When the block is stopped by a signal: let the cancelled Spark jobs' tasks end, then stop Spark in order.

    A process that exits with tasks still being killed shuts the JVM down under them, and it prints
    RejectedExecutionException and NullPointerException traces on the way out. Done in a new thread, because the
    signal may have interrupted this thread's py4j call, which leaves its connection unusable. At most ~wait_s + 4 s,
    well inside the 20 s a workflow task gets between SIGTERM and SIGKILL."""
    try:
        yield
    except BaseException:
        if stop_requested():
            worker = threading.Thread(target=_wind_down, args=(spark, wait_s), name="sparkvision-wind-down",
                                      daemon=True)
            worker.start()
            worker.join(wait_s + 10)
        raise


def _wind_down(spark: SparkSession, wait_s: float) -> None:
    with contextlib.suppress(Exception):  # the JVM may be gone already (the whole process group was signalled)
        spark.sparkContext.cancelAllJobs()
        tracker = spark.sparkContext._jsc.sc().statusTracker()
        deadline = time.monotonic() + wait_s
        # a cancelled job ends before its tasks have stopped, and a task reported killed may still be running its
        # completion listeners: wait for the running-task count, then for spark.python.task.killTimeout (2 s), after
        # which Spark kills a Python worker that has not stopped
        while any(e.numRunningTasks() for e in tracker.getExecutorInfos()) and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(2.5)
        spark.stop()


@contextlib.contextmanager
def scoped_conf(spark: SparkSession, settings: dict[str, str]) -> Iterator[None]:
    """Session settings for one job only: previous values come back afterwards (a notebook's session too)."""
    previous = {k: spark.conf.get(k, None) for k in settings}
    for k, v in settings.items():
        spark.conf.set(k, v)
    try:
        yield
    finally:
        for k, v in previous.items():
            if v is None:
                spark.conf.unset(k)
            else:
                spark.conf.set(k, v)


T = TypeVar("T")


def run_concurrently(actions: list[Callable[[], T]]) -> list[T]:
    """Run independent Spark actions as concurrent jobs from driver threads; results in order, first error raised.

    Small jobs (writing a split, counting a table) spend most of their time in per-job overhead on the driver;
    submitting them together lets the executors' task slots stay busy.
    """
    from concurrent.futures import ThreadPoolExecutor

    if len(actions) <= 1:
        return [a() for a in actions]
    with ThreadPoolExecutor(max_workers=len(actions)) as pool:
        futures = [pool.submit(a) for a in actions]
        return [f.result() for f in futures]


def _murmur3_int(value: int, seed: int = 42) -> int:
    """Spark's Murmur3_x86_32.hashInt (what HashPartitioning computes for an int key), as a signed 32-bit int."""
    def rotl(x: int, r: int) -> int:
        return ((x << r) | (x >> (32 - r))) & 0xFFFFFFFF

    k1 = rotl((value & 0xFFFFFFFF) * 0xCC9E2D51 & 0xFFFFFFFF, 15) * 0x1B873593 & 0xFFFFFFFF
    h1 = (rotl(seed ^ k1, 13) * 5 + 0xE6546B64) & 0xFFFFFFFF
    h1 ^= 4
    h1 = (h1 ^ (h1 >> 16)) * 0x85EBCA6B & 0xFFFFFFFF
    h1 = (h1 ^ (h1 >> 13)) * 0xC2B2AE35 & 0xFFFFFFFF
    h1 ^= h1 >> 16
    return h1 - (1 << 32) if h1 >= 1 << 31 else h1


def partition_keys(n: int) -> list[int]:
    """For each partition p < n, an int key that `repartition(n, key)` sends to partition p. Keys 0..n-1 themselves
    collide (Spark hashes keys, it does not map them), leaving some partitions empty and others doubled."""
    keys: dict[int, int] = {}
    candidate = 0
    while len(keys) < n:
        keys.setdefault(_murmur3_int(candidate) % n, candidate)
        candidate += 1
    return [keys[p] for p in range(n)]
