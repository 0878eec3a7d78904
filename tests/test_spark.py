"""The one SparkSession builder: executors get the environment TensorFlow and Horovod need."""
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def clean_env() -> dict[str, str]:
    """This environment without spark-submit's gateway or --verbose: the child starts its own quiet JVM."""
    return {k: v for k, v in os.environ.items() if k not in ("PYSPARK_GATEWAY_PORT", "SPARKVISION_VERBOSE")}


def run_python(code: str, timeout: int):
    """`code` in a new interpreter with its own Spark, output captured."""
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=clean_env(),
                          timeout=timeout)


def test_executors_get_legacy_keras_and_arrow(spark):
    def env(_):
        import os as o

        return [(o.environ.get("TF_USE_LEGACY_KERAS"), o.environ.get("SPARKVISION_TF_THREADS"))]

    seen = set(spark.sparkContext.parallelize(range(4), 2).mapPartitions(env).collect())
    assert seen == {("1", str(max(1, (os.cpu_count() or 1) // 2)))}
    assert spark.conf.get("spark.sql.execution.arrow.pyspark.enabled") == "true"
    assert spark.conf.get("petastorm.spark.converter.parentCacheDirUrl").startswith("file://")
    assert os.environ["TF_USE_LEGACY_KERAS"] == "1"


def test_a_session_started_from_python_prints_nothing_and_keeps_the_users_driver_jvm_options(tmp_path):
    """Quiet by default: starting the JVM from Python (the CLI's case) writes nothing to stderr; the quiet logging
    option goes beside the configured driver JVM options (spark.driver_java_options, spark.extra_conf), not instead
    of them."""

    own = ['spark.extra_conf={"spark.driver.extraJavaOptions": "-Dsparkvision.probe=kept"}',
           "spark.driver_java_options=-Dsparkvision.own=too"]
    code = ("from pipelines.config import load_config; from pipelines.spark import get_spark; "
            f"s = get_spark(load_config([], ['spark.master=local[1]', 'paths.datasets_root={tmp_path}/d', *{own!r}])); "
            "prop = s.sparkContext._jvm.java.lang.System.getProperty; "
            "print(s.range(5).count(), prop('sparkvision.probe'), prop('sparkvision.own')); s.stop()")
    res = run_python(code, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == "5 kept too"
    assert res.stderr.strip() == "", res.stderr[-2000:]


def test_the_local_overlays_jvm_runs_with_its_compiler_options(tmp_path):
    """conf/local.yaml's driver JVM options reach the local[N] JVM (a misspelt HotSpot flag would stop it starting;
    a dropped one would leave the defaults)."""
    code = ("from pipelines.config import load_config; from pipelines.spark import get_spark; "
            f"s = get_spark(load_config([{str(ROOT / 'conf/local.yaml')!r}], ['paths.datasets_root={tmp_path}/d'])); "
            "jvm = s.sparkContext._jvm; "
            "bean = jvm.java.lang.management.ManagementFactory.getPlatformMXBean("
            "jvm.java.lang.Class.forName('com.sun.management.HotSpotDiagnosticMXBean')); "
            "print(*(bean.getVMOption(f'Tier4{k}Threshold').getValue() "
            "for k in ('Invocation', 'Compile', 'BackEdge'))); s.stop()")
    res = run_python(code, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split() == ["50000", "60000", "400000"]


def test_local_executors_run_the_daemon_that_drops_horovods_closed_pipe_error_only(spark):
    from horovod.runner.util.streams import Pipe

    from pipelines.executor_daemon import is_closed_pipe

    def daemon_and_hook(_):
        import sys as s
        import threading

        return [(s.modules["__main__"].__spec__.name, threading.excepthook.__name__)]

    assert set(spark.sparkContext.parallelize(range(2), 2).mapPartitions(daemon_and_hook).collect()) == {
        ("pipelines.executor_daemon", "_thread_error")}
    pipe = Pipe()
    pipe.close()
    with pytest.raises(RuntimeError) as closed:  # what Horovod's output thread hits when a stopped run closes the pipe
        pipe.write("last line\n")
    assert is_closed_pipe(RuntimeError, closed.value, closed.tb)
    with pytest.raises(RuntimeError) as elsewhere:
        raise RuntimeError("Pipe is closed")  # the same words from anywhere else are still printed
    assert not is_closed_pipe(RuntimeError, elsewhere.value, elsewhere.tb)


def test_a_local_workers_gc_pass_after_each_task_skips_what_its_first_task_left(spark):
    """PySpark's daemon collects garbage after every task; the local daemon freezes the survivors of a worker's
    first pass, so a worker that has run a task before starts the next one with its imports frozen."""
    def frozen(_):
        import gc
        import os as o

        return [(o.getpid(), gc.get_freeze_count())]

    seen = spark.sparkContext.parallelize(range(12), 12).mapPartitions(frozen).collect()
    by_worker: dict[int, list[int]] = {}
    for pid, count in seen:
        by_worker.setdefault(pid, []).append(count)
    assert any(len(counts) > 1 for counts in by_worker.values()), seen  # workers were reused
    assert all(max(counts) > 10_000 for counts in by_worker.values() if len(counts) > 1), seen


def test_a_crashed_python_worker_is_still_reported_and_named_in_the_error(tmp_path):
    """The log4j filter hides the executor's after-stop lines only; a worker that dies while Spark runs is shown."""

    code = ("import os; from pipelines.config import load_config; from pipelines.spark import get_spark; "
            "from pipelines.errors import first_line\n"
            f"s = get_spark(load_config([], ['spark.master=local[1]', 'paths.datasets_root={tmp_path}/d']))\n"
            "def die(rows):\n    os.kill(os.getpid(), 9)\n    yield 1\n"
            "try:\n    s.sparkContext.parallelize(range(2), 1).mapPartitions(die).collect()\n"
            "except Exception as exc:\n    print(first_line(exc))\n"
            "s.stop()")
    res = run_python(code, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "Job aborted due to stage failure" in res.stdout and "Python worker exited unexpectedly" in res.stdout
    assert "ERROR Executor: Exception in task 0.0 in stage 0.0 (TID 0)\n" in res.stderr


@pytest.mark.parametrize("to", ["driver", "process_group"])  # `kill -INT PID`; Ctrl-C in a terminal
def test_ctrl_c_during_a_spark_job_stops_quietly_and_promptly(tmp_path, to):
    """PySpark's own SIGINT handler cancelled jobs from inside the interrupted py4j call (py4j printed a
    reentrant-call traceback per call) and exiting mid-cancel made the JVM print Java traces: now one line."""
    import signal
    import subprocess
    import sys
    import time

    code = ("import sys, time\n"
            "from pipelines.config import load_config\n"
            "from pipelines.signals import Stopped, stop_on_signals, stop_requested\n"
            "from pipelines.spark import get_spark, wind_down_on_stop\n"
            "with stop_on_signals():\n"
            f"    spark = get_spark(load_config([], ['spark.master=local[2]', 'paths.datasets_root={tmp_path}/d']))\n"
            "    try:\n"
            "        with wind_down_on_stop(spark):\n"
            "            print('running', flush=True)\n"
            "            slow = lambda batches: (time.sleep(300) or b for b in batches)\n"
            "            spark.range(0, 2, 1, 2).mapInPandas(slow, 'id long').collect()  # as evaluate and infer\n"
            "    except BaseException:  # as the CLI: the signal may surface as py4j's error, not Stopped\n"
            "        stopped = Stopped(stop_requested())\n"
            "        print(stopped, file=sys.stderr)\n"
            "        sys.exit(stopped.exit_code)\n")
    env = clean_env()
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, start_new_session=True)
    assert proc.stdout.readline().strip() == "running"
    time.sleep(5)  # the two tasks are sleeping in their Python workers
    started = time.monotonic()
    if to == "driver":
        proc.send_signal(signal.SIGINT)
    else:
        os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-3000:]
    assert err.strip() == "stopped by SIGINT", err[-3000:]
    assert time.monotonic() - started < 20  # a workflow task's SIGTERM-to-SIGKILL grace


def test_a_job_submitted_after_the_stop_signal_is_cancelled_too(tmp_path):
    """A signal that arrives while the driver is still planning a job finds nothing to cancel: the job then ran to its
    end (a loaded CI machine hung here). Cancelling goes on until the SparkContext stops, then ends."""

    code = ("import threading, time\n"
            "from pipelines.config import load_config\n"
            "from pipelines.spark import cancel_jobs_until_stopped, get_spark\n"
            f"spark = get_spark(load_config([], ['spark.master=local[2]', 'paths.datasets_root={tmp_path}/d']))\n"
            "canceller = threading.Thread(target=cancel_jobs_until_stopped, args=(spark,), daemon=True)\n"
            "canceller.start()\n"
            "time.sleep(1)  # the first cancel has found no job\n"
            "slow = lambda batches: (time.sleep(300) or b for b in batches)\n"
            "started = time.monotonic()\n"
            "try:\n"
            "    spark.range(0, 2, 1, 2).mapInPandas(slow, 'id long').collect()\n"
            "    print('finished')\n"
            "except Exception as exc:\n"
            "    print('cancelled' if 'cancelled' in str(exc) else str(exc)[:300], round(time.monotonic() - started))\n"
            "spark.stop()\n"
            "canceller.join(5)\n"
            "print('canceller alive:', canceller.is_alive())\n")
    res = run_python(code, timeout=240)
    assert res.returncode == 0, res.stderr[-2000:]
    outcome, took = res.stdout.splitlines()[0].rsplit(" ", 1)
    assert outcome == "cancelled" and int(took) < 60, res.stdout
    assert res.stdout.splitlines()[1] == "canceller alive: False"


@pytest.mark.parametrize("master,elastic,expected", [
    ("local[2]", "true", "local[2,3]"),  # elastic: a lost worker's Spark task must be run again
    ("local[2]", "false", "local[2]"),
    ("local[2,5]", "true", "local[2,5]"),  # the user's own F stays
    ("spark://127.0.0.1:7077", "true", "spark://127.0.0.1:7077"),
])
def test_elastic_training_gets_task_retries_on_a_local_master(master, elastic, expected):
    from pipelines.config import load_config
    from pipelines.spark import local_cores, local_task_failures, master_url

    cfg = load_config([], [f"spark.master={master}", f"train.elastic={elastic}", "train.max_restarts=2"])
    assert master_url(cfg) == expected
    assert local_cores("local[2,3]") == 2 and local_task_failures("local[2,3]") == 3
    assert local_task_failures("local[2]") == 1


def test_partition_keys_put_each_key_in_the_partition_of_its_index(spark):
    from pyspark.sql import functions as F

    from pipelines.spark import _murmur3_int, partition_keys

    values = [*range(-40, 300), 2**31 - 1, -(2**31)]
    hashed = spark.createDataFrame([(v,) for v in values], "k int").select("k", F.hash("k").alias("h")).collect()
    assert all(_murmur3_int(r["k"]) == r["h"] for r in hashed)  # Spark's own hash of an int key
    for n in (3, 12, 40):
        keys = partition_keys(n)
        placed = (spark.createDataFrame([(k,) for k in keys], "k int").repartition(n, "k")
                  .select("k", F.spark_partition_id().alias("p")).collect())
        assert sorted((keys.index(r["k"]), r["p"]) for r in placed) == [(p, p) for p in range(n)]
    naive = spark.range(12).repartition(12, "id").select(F.spark_partition_id()).distinct().count()
    assert naive < 12  # why the keys are needed: 0..11 themselves collide
