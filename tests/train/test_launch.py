"""The driver's side of a launch: which worker's error is reported, and the epoch lines printed while they train."""
import json

import pytest

from pipelines.environment import VERBOSE_VAR
from pipelines.train.launch import (EpochPrinter, WorkerLost, WorkerOutput, epoch_line, launch_failure,
                                    worker_exception, worker_process_env)


def test_the_reported_failure_is_the_cause_not_the_workers_horovod_shut_down(tmp_path):
    log = tmp_path / "workers.log"
    log.write_text("[2]<stderr>:ValueError: from an earlier launch\n")  # not this launch: skipped
    out = WorkerOutput(log)
    out.write("[0]<stderr>:Traceback (most recent call last):\n"
              "[0]<stderr>:tensorflow.python.framework.errors_impl.UnknownError: Graph execution error:\n"
              "[0]<stderr>:Horovod has been shut down. This was caused by an exception on one of the ranks\n"
              "[1]<stderr>:Traceback (most recent call last):\n"
              "[1]<stderr>:  File \"worker.py\", line 1, in <module>\n"
              "[1]<stderr>:OSError: [Errno 2] No such file or directory: '/data/x'\n")
    out.flush()
    # Horovod names rank 0 as the first to exit: it is only a casualty of rank 1's error
    cause = worker_exception(out, "Process name: 0\nExit code: 1")
    assert cause == "OSError: [Errno 2] No such file or directory: '/data/x'"
    assert worker_exception(WorkerOutput(tmp_path / "empty.log"), "Process name: 0") is None


def test_a_worker_that_died_is_named_by_rank_host_pid_and_signal_not_by_its_casualtys_error(tmp_path):
    out = WorkerOutput(tmp_path / "workers.log")
    out.write("[0]<stderr>:sparkvision worker rank 0 of 2 on node-a pid 101\n"
              "[1]<stderr>:sparkvision worker rank 1 of 2 on node-b pid 202\n"
              "[0]<stderr>:tensorflow.python.framework.errors_impl.UnknownError: Graph execution error:\n"
              "[0]<stderr>:Horovod has been shut down. This was caused by an exception on one of the ranks\n")
    out.flush()
    horovod = RuntimeError("Horovod detected that one or more processes exited with non-zero status, thus causing "
                           "the job to be terminated. The first process to do so was:\nProcess name: 1\nExit code: 137")
    failure = launch_failure(horovod, out, 2, 600)
    assert isinstance(failure, WorkerLost)
    assert str(failure).startswith("training lost a Horovod worker: worker rank 1 (on node-b, pid 202) was killed by "
                                   "SIGKILL (exit code 137); worker log: ")
    # a worker's own exception is a failure of the training code: not WorkerLost, so not restarted
    out.write("[1]<stderr>:ValueError: bad batch\n")
    out.flush()
    own = launch_failure(horovod, out, 2, 600)
    assert not isinstance(own, WorkerLost) and "(ValueError: bad batch)" in str(own)
    quiet = WorkerOutput(tmp_path / "other.log")  # no identity line, an exit code
    lost = launch_failure(RuntimeError("...\nProcess name: 0\nExit code: 3"), quiet, 2, 600)
    assert isinstance(lost, WorkerLost) and "worker rank 0 exited with code 3;" in str(lost)


def test_in_elastic_mode_the_lost_worker_is_named_from_the_lines_that_end_its_process(tmp_path):
    """The elastic driver's failure names no process, and its [N] prefixes are slots, not ranks."""
    out = WorkerOutput(tmp_path / "workers.log")
    out.write("[0]<stderr>:sparkvision worker rank 0 of 2 on node-a pid 101\n"
              "[0]<stderr>:Killed\n"
              "[1]<stderr>:sparkvision worker rank 1 of 2 on node-b pid 202\n"
              "[1]<stderr>:terminate called after throwing an instance of 'gloo::EnforceNotMet'\n"
              "[1]<stderr>:Aborted\n"
              "[0]<stderr>:sparkvision worker rank 1 of 2 on node-a pid 303\n")
    out.flush()
    elastic = RuntimeError("Horovod detected that one or more processes exited with non-zero status, thus causing "
                           "the job to be terminated. The first process to do so was:")
    lost = launch_failure(elastic, out, 2, 600)
    assert isinstance(lost, WorkerLost)
    assert str(lost).startswith("training lost a Horovod worker: worker rank 0 (on node-a, pid 101): Killed, then 1 "
                                "more; worker log: ")
    nothing = launch_failure(elastic, WorkerOutput(tmp_path / "empty.log"), 2, 600)
    assert "a Horovod worker was lost (RuntimeError: Horovod detected" in str(nothing)


METRICS = {"epoch": 1, "loss": 0.5, "accuracy": 0.8, "lr": 0.002, "images_per_second": 2100.4,
           "input_wait_fraction": 0.012, "epoch_seconds": 25.04}


def test_an_epoch_line_says_where_training_is_and_how_fast():
    assert epoch_line(METRICS, 8) == ("epoch 2/8: loss 0.5000, acc 0.8000, lr 2.00e-03, 2100 img/s, input wait "
                                      "1.2%, 25.0s")
    with_val = epoch_line({**METRICS, "val_loss": 0.4, "val_accuracy": 0.85}, 8)
    assert "acc 0.8000, val_loss 0.4000, val_acc 0.8500, lr" in with_val


def test_the_printer_prints_each_complete_epoch_once_and_skips_earlier_launches(tmp_path, capsys):
    progress = tmp_path / "progress.jsonl"
    progress.write_text(json.dumps({**METRICS, "epoch": 0}) + "\n")  # a launch before a resume
    printer = EpochPrinter(progress, 3)
    with open(progress, "a") as fh:
        fh.write(json.dumps(METRICS) + "\n" + '{"epoch": 2, "lo')  # the next line is still being written
    printer.poll()
    printer.poll()
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["[train] " + epoch_line(METRICS, 3)]


def test_workers_get_the_required_environment_and_the_drivers_verbosity(cfg_factory, monkeypatch):
    monkeypatch.setenv(VERBOSE_VAR, "0")
    env = worker_process_env(cfg_factory("train.horovod_cycle_time_ms=2.5").train, "sqlite:///m.db", "/ck/run")
    assert env["TF_USE_LEGACY_KERAS"] == "1" and env[VERBOSE_VAR] == "0" and env["TF_CPP_MIN_LOG_LEVEL"] == "3"
    assert env["MLFLOW_TRACKING_URI"] == "sqlite:///m.db" and env["HOROVOD_CYCLE_TIME"] == "2.5"
    assert "HOROVOD_CYCLE_TIME" not in worker_process_env(cfg_factory().train, "x", "/ck/run")
    # elastic mode runs without Horovod's response cache: with it, rejoining workers were aborted by Gloo
    assert worker_process_env(cfg_factory("train.elastic=true").train, "x", "/ck/run")["HOROVOD_CACHE_CAPACITY"] == "0"
    assert "HOROVOD_CACHE_CAPACITY" not in worker_process_env(cfg_factory().train, "x", "/ck/run")
    # the timeline goes into the run's checkpoint folder, only when asked for
    timeline = worker_process_env(cfg_factory("train.horovod_timeline=true").train, "x", "/ck/run")
    assert timeline["HOROVOD_TIMELINE"] == "/ck/run/horovod_timeline.json"
    assert "HOROVOD_TIMELINE" not in env


def test_an_epoch_line_names_the_ring_size_only_when_elastic_mode_lost_a_worker():
    assert "workers" not in epoch_line({**METRICS, "workers": 2}, 8, 2)
    assert epoch_line({**METRICS, "workers": 1}, 8, 2).endswith(", lr 2.00e-03, 2100 img/s, input wait 1.2%, 25.0s") \
        and ", acc 0.8000, 1 of 2 workers, lr " in epoch_line({**METRICS, "workers": 1}, 8, 2)


def test_elastic_training_on_a_local_master_without_task_retries_is_a_config_error(cfg_factory):
    from types import SimpleNamespace

    from pipelines.config import ConfigError
    from pipelines.train.launch import check_elastic_master

    def session(master):
        return SimpleNamespace(sparkContext=SimpleNamespace(master=master))

    elastic = cfg_factory("train.elastic=true").train
    with pytest.raises(ConfigError, match=r"train.elastic on spark.master local\[2\] needs Spark task retries: "
                                          r"use local\[2,3\]"):
        check_elastic_master(session("local[2]"), elastic)
    check_elastic_master(session("local[2,3]"), elastic)
    check_elastic_master(session("spark://127.0.0.1:7077"), elastic)  # spark.task.maxFailures: 4 by default
    check_elastic_master(session("local[2]"), cfg_factory().train)  # not elastic: no retries needed
