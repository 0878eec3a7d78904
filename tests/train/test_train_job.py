"""Distributed training with real Horovod workers (Gloo) on a real local[2] SparkSession."""
import json
import os
import re
import sys
import threading
import time

import cloudpickle
import mlflow
import numpy as np
import pytest

from pipelines.config import ConfigError, resolve_path
from pipelines.errors import PipelineError
from pipelines.ingest.job import run_ingest
from pipelines.train.checkpoints import read_state
from pipelines.train.schedule import BestEpoch
from pipelines.train.job import run_train
from pipelines.train.spec import steps_per_epoch
from pipelines.train.worker import train_worker
from tests.fixtures import ListeningSampler, is_loopback, write_idx_slice

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import the tests package


@pytest.fixture(scope="module")
def small(tmp_path_factory, spark):
    """A 1,500-image Fashion-MNIST slice whose train split has an odd number of row groups (uneven shards)."""
    from tests.conftest import make_config

    root = tmp_path_factory.mktemp("train")
    src = write_idx_slice(root / "idx", train=1500, test=300)
    overrides = [f"ingest.source.path={src}", "ingest.row_group_rows=150", "ingest.files_per_split=1",
                 "train.batch_size=32", "train.epochs=1", "train.num_proc=2", "train.warmup_epochs=0",
                 "train.width=0.5"]
    cfg = make_config(root, *overrides)
    out = run_ingest(spark, cfg)
    return root, overrides, out


def cfg_for(small, *extra):
    from tests.conftest import make_config

    root, overrides, _ = small
    return make_config(root, *overrides, *extra)


@pytest.mark.fault('what training listens on (Horovod services, Gloo, Spark)', kind='security',
                   shows='127.0.0.1 only, on a local master')
def test_two_workers_train_in_sync_and_log_everything(spark, small):
    _, _, ingested = small
    from pipelines.train.data import open_batch_reader

    shard_rows = []
    for shard in (0, 1):
        with open_batch_reader(f"file://{ingested['path']}/train", columns=["label"], shard=shard,
                               shard_count=2) as reader:
            shard_rows.append(sum(len(b.label) for b in reader))
    assert sum(shard_rows) == ingested["counts"]["splits"]["train"]
    assert shard_rows[0] != shard_rows[1], "the fixture must give the two workers uneven shards"
    cfg = cfg_for(small, "train.epochs=4", "train.bind_cores=true", "mlflow.system_metrics_seconds=1",
                  "train.horovod_timeline=true")
    with ListeningSampler() as listening:
        out = run_train(spark, cfg)
    assert out["workers"] == 2 and out["weights_in_sync"]
    # Horovod's driver, task and rendezvous services, Gloo, Spark: on a local master, all on the loopback address
    # seen while the workers ran: the Python daemon's own port and the Horovod task services in its workers (the
    # Gloo workers themselves live too briefly here to be sure of catching)
    assert sum("executor_daemon" in what for what in listening.seen.values()) >= 2, listening.seen
    assert all(is_loopback(ip) for ip, _ in listening.seen), listening.seen
    allowed = sorted(os.sched_getaffinity(0))
    cores0, cores1 = out["worker_cores"]
    if len(allowed) >= 2:  # each worker kept to its own cores
        assert cores0 and cores1 and not set(cores0) & set(cores1) and set(cores0) | set(cores1) <= set(allowed)
    else:
        assert cores0 == cores1 == allowed
    assert out["steps_per_worker"] == 4 * steps_per_epoch(ingested["counts"]["splits"]["train"], 32, 2)
    client = mlflow.MlflowClient()
    run = client.get_run(out["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["train.optimizer"] == "adam" and run.data.params["dataset"] == out["dataset"]
    assert run.data.tags["num_workers"] == "2"
    assert run.info.run_name == f"train mnist_cnn {out['dataset']}"
    for rank in (0, 1):  # every worker's system metrics, by node
        assert {f"system/rank{rank}/cpu_utilization_percentage",
                f"system/rank{rank}/system_memory_usage_megabytes"} <= set(run.data.metrics), sorted(run.data.metrics)
    history = client.get_metric_history(out["run_id"], "val_accuracy")
    assert sorted(m.step for m in history) == [0, 1, 2, 3]
    assert run.inputs.dataset_inputs and run.inputs.dataset_inputs[0].dataset.name == out["dataset"]
    artifacts = {a.path for a in client.list_artifacts(out["run_id"])}
    assert {"learning_curve.png", "config.yaml"} <= artifacts
    # Horovod's timeline: rank 0's trace as an artifact, one round of gradient allreduces per step, broken down
    assert [a.path for a in client.list_artifacts(out["run_id"], "horovod")] == ["horovod/horovod_timeline.json"]
    steps = out["horovod_timeline"]
    assert steps["steps"] == out["steps_per_worker"], steps
    assert 0 < steps["allreduce_ms"] < steps["step_ms"] and 0 <= steps["tail_ms"] < steps["step_ms"], steps
    assert run.data.metrics["horovod_step_ms"] == steps["step_ms"]
    model = mlflow.pyfunc.load_model(f"models:/{cfg.mlflow.registered_model}/{out['version']}")
    probs = model.predict(np.zeros((3, 28, 28, 1), dtype=np.uint8))
    assert np.asarray(probs).shape == (3, 10)
    inputs, outputs = (model.metadata.signature.inputs.inputs[0], model.metadata.signature.outputs.inputs[0])
    assert (inputs.type, inputs.shape, outputs.type, outputs.shape) == (np.dtype(np.uint8), (-1, 28, 28, 1),
                                                                        np.dtype(np.float32), (-1, 10))
    requirements = mlflow.pyfunc.get_model_dependencies(f"runs:/{out['run_id']}/model")
    pinned = {line.split("==")[0] for line in open(requirements).read().split()}
    assert {"tensorflow", "tf-keras", "mlflow"} <= pinned  # what loading it elsewhere needs
    # learned something from 1,200 images in 4 short epochs: 3x the 10% chance level, and val_loss fell
    assert out["metrics"]["val_accuracy"] > 0.3
    val_loss = sorted(client.get_metric_history(out["run_id"], "val_loss"), key=lambda m: m.step)
    assert val_loss[-1].value < val_loss[0].value


def test_resume_continues_at_the_next_epoch_in_the_same_run(spark, small):
    first = run_train(spark, cfg_for(small, "train.epochs=1"))
    state_file = resolve_path(cfg_for(small).paths.checkpoints_root) / first["run_id"] / "state.json"
    state = json.loads(state_file.read_text())
    assert state["epoch"] == 1 and state["precision"] == first["precision"]
    # As if the checkpoint came from hardware where `auto` resolved otherwise (a GPU: float16; a CPU with AMX:
    # bfloat16): the resume must keep the checkpoint's precision, not resolve `auto` again here.
    state["precision"] = "float32" if first["precision"] != "float32" else "mixed_bfloat16"
    state_file.write_text(json.dumps(state))
    resumed = run_train(spark, cfg_for(small, "train.epochs=3"), resume=first["run_id"])
    assert resumed["run_id"] == first["run_id"]
    assert resumed["epochs_run"] == 3
    assert resumed["precision"] == state["precision"]
    # one checkpoint left, under the prefix state.json names (a prefix per epoch: never half of the next one)
    assert json.loads(state_file.read_text())["checkpoint"] == "ckpt-0003"
    assert sorted({f.name.split(".")[0] for f in state_file.parent.glob("ckpt*")}) == ["ckpt-0003"]
    steps = sorted(m.step for m in mlflow.MlflowClient().get_metric_history(first["run_id"], "loss"))
    assert steps == [0, 1, 2]
    run = mlflow.get_run(first["run_id"])
    assert run.data.tags["resumed_at_epoch_2"] == "train.epochs: 1 -> 3"


def test_a_resume_that_cannot_go_on_says_why_and_leaves_the_run_as_it_was(spark, small):
    first = run_train(spark, cfg_for(small, "train.epochs=1"))
    with pytest.raises(ConfigError, match=r"the run was trained with train.dropout 0.25 \(here 0.5\), train.model "
                                          r"mnist_cnn \(here lenet5\); resume with the run's settings \(--set "
                                          r"train.dropout=0.25 --set train.model=mnist_cnn\) or start a new run"):
        run_train(spark, cfg_for(small, "train.epochs=2", "train.model=lenet5", "train.dropout=0.5"),
                  resume=first["run_id"])
    with pytest.raises(PipelineError, match="already trained 1 epochs; set train.epochs above 1"):
        run_train(spark, cfg_for(small, "train.epochs=1"), resume=first["run_id"])
    run = mlflow.get_run(first["run_id"])
    assert run.info.status == "FINISHED" and not any(t.startswith("resumed_at") for t in run.data.tags)


def failing_worker(spec):
    import horovod.tensorflow as hvd

    hvd.init()
    if hvd.rank() == 1:
        raise RuntimeError("worker 1 exploded")
    return train_worker(spec)


@pytest.mark.fault('a worker raising an error of its own', kind='fault',
                   shows='FAILED at once with that error, not retried')
def test_a_failing_worker_fails_the_run_without_hanging(spark, small):
    cfg = cfg_for(small, "train.timeout_s=300")
    with pytest.raises(PipelineError, match=r"training failed on a Horovod worker \(RuntimeError: worker 1 exploded\)"):
        run_train(spark, cfg, worker_fn=failing_worker)
    runs = mlflow.search_runs(order_by=["start_time DESC"], max_results=1)
    assert runs.iloc[0]["status"] == "FAILED"


def worker_killed_once_in_epoch_2(spec):
    """Rank 1 SIGKILLs itself (as the OOM killer would: no handler, no exception) shortly into epoch 2, once."""
    import signal
    from pathlib import Path

    import horovod.tensorflow as hvd

    hvd.init()
    marker, progress = Path(spec.checkpoint_dir).parent / "killed_once", Path(spec.checkpoint_dir) / "progress.jsonl"

    def kill_after_epoch_1():
        # at once: an epoch of this small split lasts about 0.3 s once warm, so any wait here could let epoch 2
        # finish (and checkpoint) first, and the restart would then go on from epoch 3
        while not (progress.exists() and progress.read_text().count("\n") >= 1):
            time.sleep(0.01)
        marker.write_text(spec.run_id)
        os.kill(os.getpid(), signal.SIGKILL)

    if hvd.rank() == 1 and not marker.exists():
        threading.Thread(target=kill_after_epoch_1, daemon=True).start()
    return train_worker(spec)


@pytest.mark.fault('a training worker SIGKILLed mid-epoch (train.max_restarts 2)', kind='fault',
                   shows="relaunched from the last epoch's checkpoint in the same run; FINISHED, each epoch logged once, a restart_1 tag naming rank, host, pid and SIGKILL")
def test_a_killed_worker_is_relaunched_from_the_last_checkpoint_in_the_same_run(spark, small, tmp_path, capsys,
                                                                              observe):
    cfg = cfg_for(small, "train.epochs=3", f"paths.checkpoints_root={tmp_path}/ck")
    out = run_train(spark, cfg, worker_fn=worker_killed_once_in_epoch_2)
    assert (tmp_path / "ck" / "killed_once").read_text() == out["run_id"]  # it was killed, in this run
    assert out["epochs_run"] == 3 and out["weights_in_sync"] and out["metrics"]["val_accuracy"] > 0.3
    client = mlflow.MlflowClient()
    run = client.get_run(out["run_id"])
    assert run.info.status == "FINISHED"
    assert re.fullmatch(r"from epoch 2: worker rank 1 \(on \S+, pid \d+\) was killed by SIGKILL \(exit code 137\)",
                        run.data.tags["restart_1"]), run.data.tags
    assert [(m.step, m.value) for m in client.get_metric_history(out["run_id"], "restarts")] == [(1, 1.0)]
    for key in ("loss", "val_accuracy"):  # every epoch logged once: none lost, none twice
        assert sorted(m.step for m in client.get_metric_history(out["run_id"], key)) == [0, 1, 2]
    observe(**{"run": run.info.status, "restarts": 1, "epochs logged": [0, 1, 2], "epochs recomputed": 1,
               "val_accuracy": round(out["metrics"]["val_accuracy"], 4), "seconds": out["seconds"]})
    err = capsys.readouterr().err
    assert re.search(r"\[train\] worker rank 1 \(on \S+, pid \d+\) was killed by SIGKILL \(exit code 137\); "
                     r"restart 1 of 2 from the checkpoint of epoch 1\n\[train\] epoch 2/3: ", err), err


@pytest.mark.fault("the same with train.max_restarts 0, then the workflow task's retry", kind='fault',
                   shows='FAILED with one line naming the dead worker and --resume; the retry resumes the same run to the end')
def test_with_restarts_off_a_killed_worker_fails_the_run_naming_it_and_a_workflow_retry_resumes_it(
        spark, small, tmp_path, monkeypatch, observe):
    from pipelines.environment import TASK_RUN_FILE_VAR

    monkeypatch.setenv(TASK_RUN_FILE_VAR, str(tmp_path / "train.run"))  # as the workflow runner sets it
    cfg = cfg_for(small, "train.epochs=3", "train.max_restarts=0", f"paths.checkpoints_root={tmp_path}/ck")
    started = time.monotonic()
    with pytest.raises(PipelineError, match=r"training lost a Horovod worker: worker rank 1 \(on \S+, pid \d+\) "
                                            r"was killed by SIGKILL \(exit code 137\); worker log: .*workers.log "
                                            r"\(train.max_restarts=0\); continue with --resume \w+$") as lost:
        run_train(spark, cfg, worker_fn=worker_killed_once_in_epoch_2)
    failed_after = time.monotonic() - started
    assert failed_after < 240  # detected and failed, not hung until a timeout
    run_id = str(lost.value).rsplit(" ", 1)[-1]
    assert mlflow.get_run(run_id).info.status == "FAILED"
    assert (tmp_path / "train.run").read_text() == run_id
    resumed = run_train(spark, cfg)  # the task's retry: the same command, no --resume
    assert resumed["run_id"] == run_id and resumed["epochs_run"] == 3
    tags = mlflow.get_run(run_id).data.tags
    assert tags["resumed_at_epoch_2"] == "no changes" and "error" not in tags  # FINISHED now: no error tag
    assert tags["error_before_epoch_2"].startswith("WorkerLost: training lost a Horovod worker: worker rank 1")
    observe(**{"failed after s (from the start)": round(failed_after), "run": "FAILED, then FINISHED by the retry",
               "epochs logged": [0, 1, 2]})
    assert sorted(m.step for m in mlflow.MlflowClient().get_metric_history(run_id, "loss")) == [0, 1, 2]


def start_tracking_server(store: str, port: int):
    """A real MLflow tracking server on 127.0.0.1:`port` over the SQLite store `store`, once it answers."""
    import subprocess
    import urllib.request

    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--backend-store-uri", store, "--workers", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise AssertionError("the tracking server did not start")


def stop_group(proc) -> None:
    import signal

    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=60)


@pytest.mark.fault("the MLflow tracking server stopped during training and started again 10 s later", kind="fault",
                   shows="training goes on; the run FINISHED with every epoch's metrics logged once")
def test_training_goes_on_while_the_tracking_server_restarts_and_loses_no_epoch(spark, small, tmp_path, observe):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = f"sqlite:///{tmp_path}/server.db"
    server = start_tracking_server(store, port)
    holder = {"server": server}
    cfg = cfg_for(small, "train.epochs=3", f"mlflow.tracking_uri=http://127.0.0.1:{port}",
                  f"paths.checkpoints_root={tmp_path}/ck")

    def restart_after_epoch_1():
        ck_root = tmp_path / "ck"
        while not any(p.read_text().count("\n") >= 1 for p in ck_root.glob("*/progress.jsonl")):
            time.sleep(0.05)
        stop_group(holder["server"])
        time.sleep(10)
        holder["server"] = start_tracking_server(store, port)
        holder["down_s"] = 10

    outage = threading.Thread(target=restart_after_epoch_1, daemon=True)
    outage.start()
    try:
        out = run_train(spark, cfg)
        outage.join(timeout=180)
        assert holder.get("down_s") == 10  # the server was down during training
        client = mlflow.MlflowClient(tracking_uri=f"http://127.0.0.1:{port}")
        assert client.get_run(out["run_id"]).info.status == "FINISHED"
        for key in ("loss", "val_accuracy"):
            assert sorted(m.step for m in client.get_metric_history(out["run_id"], key)) == [0, 1, 2]
        observe(**{"run": "FINISHED", "epochs logged": [0, 1, 2], "server down s": 10, "seconds": out["seconds"]})
    finally:
        stop_group(holder["server"])
        mlflow.set_tracking_uri(f"sqlite:///{small[0]}/mlflow.db")  # the module's store, for the tests after


def worker_missing_the_checkpoints(spec):
    import dataclasses

    import horovod.tensorflow as hvd

    hvd.init()
    if hvd.rank() == 1:  # as on an executor host that does not share the driver's storage
        spec = dataclasses.replace(spec, checkpoint_dir=spec.checkpoint_dir + "-not-shared")
    return train_worker(spec)


def test_an_executor_that_cannot_see_the_checkpoints_fails_the_run_naming_the_path(spark, small):
    with pytest.raises(PipelineError, match="cannot see the run's checkpoint directory") as failed:
        run_train(spark, cfg_for(small, "train.timeout_s=300"), worker_fn=worker_missing_the_checkpoints)
    assert "-not-shared" in str(failed.value)
    runs = mlflow.search_runs(order_by=["start_time DESC"], max_results=1)
    assert runs.iloc[0]["status"] == "FAILED"


def test_more_workers_than_local_task_slots_is_a_config_error_before_any_run(spark, small):
    before = len(mlflow.search_runs(search_all_experiments=True))
    with pytest.raises(ConfigError, match=r"train.num_proc=3 needs 3 Spark task slots at once \(one per Horovod "
                                          r"worker\) and spark.master local\[2\] has 2: set train.num_proc to at "
                                          r"most 2, or spark.master to local\[3\]"):
        run_train(spark, cfg_for(small, "train.num_proc=3"))
    assert len(mlflow.search_runs(search_all_experiments=True)) == before  # nothing to clean up


def _busy(_):
    time.sleep(120)


def test_a_busy_cluster_that_never_frees_the_slots_is_named_as_such(spark, small):
    sc = spark.sparkContext
    holding = threading.Event()

    def hold_a_slot():  # another job keeps one of the two task slots busy, as on a shared cluster
        sc.setJobGroup("hold-a-slot", "a job that keeps one slot busy", interruptOnCancel=True)
        try:
            sc.parallelize([0], 1).foreach(_busy)
        except Exception:
            pass  # cancelled below
        holding.set()

    holder = threading.Thread(target=hold_a_slot, daemon=True)
    holder.start()
    try:
        time.sleep(3)
        with pytest.raises(PipelineError, match=r"training could not start: Spark did not run 2 tasks at once "
                                                r"\(one per Horovod worker\) within train.timeout_s=10s: the cluster needs "
                                                r"train.num_proc=2 free task slots; if its executors start on demand"):
            run_train(spark, cfg_for(small, "train.timeout_s=10"))
    finally:
        sc.cancelJobGroup("hold-a-slot")
        assert holding.wait(60)
    runs = mlflow.search_runs(order_by=["start_time DESC"], max_results=1)
    assert runs.iloc[0]["status"] == "FAILED"


def train_in_a_subprocess(small, epochs: int, *extra: str):
    """`sparkvision train` in its own process group, as a user starts it; returns once epoch 1 is printed."""
    import subprocess

    root, overrides, _ = small
    paths = [f"paths.datasets_root={root}/datasets", f"paths.checkpoints_root={root}/checkpoints",
             f"mlflow.tracking_uri=sqlite:///{root}/mlflow.db", f"mlflow.artifact_location={root}/mlartifacts",
             "train.model=mnist_cnn", *overrides, f"train.epochs={epochs}", *extra]
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "train", *(x for o in paths for x in ("--set", o))],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    lines = []
    for line in proc.stderr:  # wait for the first epoch line: the workers are training
        lines.append(line)
        if line.startswith(f"[train] epoch 1/{epochs}"):
            break
    assert lines and lines[-1].startswith("[train] epoch 1/"), "".join(lines)
    return proc, lines


@pytest.mark.fault('SIGTERM to the training {to}', kind='fault',
                   shows='exit 143, run KILLED with a --resume hint, no process left')
@pytest.mark.parametrize("to", ["driver", "process_group"])  # `kill PID`; a workflow task timeout, Ctrl-C
def test_sigterm_stops_the_workers_and_ends_the_run_killed_ready_to_resume(small, to):
    import signal
    import subprocess

    root, _, _ = small
    proc, lines = train_in_a_subprocess(small, 50)
    if to == "driver":
        proc.send_signal(signal.SIGTERM)
    else:  # Spark's JVM and the workers get it too
        os.killpg(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, "".join(lines) + err
    # quiet: no Horovod task-service traceback, no Spark executor lines about the tasks the stop ended
    assert "Traceback" not in err and "ERROR" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("stopped by SIGTERM: the workers were stopped after ") and "--resume " in last
    run_id = last.rsplit(" ", 1)[-1]
    run = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root}/mlflow.db").get_run(run_id)
    assert run.info.status == "KILLED" and run.data.tags["error"] == last
    deadline = time.monotonic() + 30  # the Spark JVM and its Python workers exit once the driver has gone
    while (left := subprocess.run(["ps", "-o", "pid=,args=", "-s", str(proc.pid)], capture_output=True,
                                  text=True).stdout.strip()) and time.monotonic() < deadline:
        time.sleep(1)
    assert left == ""  # no Horovod worker, Spark JVM or executor left behind


def pid_of_rank(ancestor: int, rank: int, timeout: float = 60) -> int:
    """The pid of the Horovod worker process with HOROVOD_RANK=`rank` among `ancestor`'s descendants."""
    import psutil

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in psutil.Process(ancestor).children(recursive=True):
            try:
                if "gloo_exec_fn" in " ".join(child.cmdline()) and child.environ().get("HOROVOD_RANK") == str(rank):
                    return child.pid
            except psutil.Error:
                continue  # it ended while being looked at
        time.sleep(0.2)
    raise AssertionError(f"no Horovod rank {rank} under pid {ancestor}")


@pytest.mark.fault('training worker rank {rank} of 2 SIGKILLed mid-epoch in elastic mode (train.elastic)',
                   kind='fault', shows='no relaunch: the ring re-forms from the last commit (the survivor alone, then '
                                       'with the worker Spark starts again), the run ends FINISHED with each epoch '
                                       'logged once')
@pytest.mark.parametrize("rank", [1, 0])  # rank 0 too: its survivor becomes the new rank 0
def test_in_elastic_mode_a_killed_worker_is_survived_without_a_restart(small, observe, rank):
    import signal

    root, _, _ = small
    # batches of 8: epochs of 84 steps, long enough to kill a worker inside one. Full width, conf/local.yaml's cycle
    # time and bound cores: as a user runs it, and what made rejoining workers abort while Horovod's response cache
    # was on
    proc, lines = train_in_a_subprocess(small, 4, "train.elastic=true", "train.elastic_commit_steps=10",
                                        "train.batch_size=8", "train.width=1", "train.horovod_cycle_time_ms=4",
                                        "train.bind_cores=true")
    run_id = lines[0].split("run ", 1)[1].split(":", 1)[0]
    log = root / "checkpoints" / run_id / "workers.log"
    os.kill(pid_of_rank(proc.pid, rank), signal.SIGKILL)  # as the OOM killer would, in epoch 2
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, "".join(lines) + err
    assert "restart" not in err and "Traceback" not in err and "ERROR" not in err, err  # survived, not relaunched
    # the ring re-formed after the loss, from the last commit: with the survivor alone, or already with the worker
    # Spark started in the lost one's place; either way in this job, not a relaunch
    rings = re.findall(r"sparkvision elastic: (\d+) worker\(s\) from epoch (\d+), step (\d+)", log.read_text())
    assert len(rings) >= 2 and all(epoch in "234" for _, epoch, _ in rings[1:]), rings
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root}/mlflow.db")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and "restart_1" not in run.data.tags
    assert run.data.params["train.elastic"] == "True"
    for key in ("loss", "val_accuracy"):  # every epoch logged once: none lost, none twice
        assert sorted(m.step for m in client.get_metric_history(run_id, key)) == [0, 1, 2, 3]
    assert float(run.data.metrics["final_val_accuracy"]) > 0.3
    result = json.loads(out.strip().splitlines()[-1])  # the job's JSON last line
    observe(**{"run": run.info.status, "restarts": 0, "rings (workers, from epoch, step)":
               [tuple(int(x) for x in r) for r in rings], "epochs logged": [0, 1, 2, 3],
               "val_accuracy": round(float(run.data.metrics["final_val_accuracy"]), 4), "seconds": result["seconds"]})


@pytest.mark.fault('--resume of an unknown or non-training run', kind='bad_input', shows='one error naming the run')
def test_resume_of_unknown_run_is_a_clear_error(spark, small):
    with pytest.raises(PipelineError, match="no such MLflow run"):
        run_train(spark, cfg_for(small), resume="0123456789abcdef")
    mlflow.set_tracking_uri(f"sqlite:///{small[0]}/mlflow.db")
    with mlflow.start_run() as other:
        mlflow.set_tag("sparkvision.stage", "evaluate")
    with pytest.raises(PipelineError, match=rf"--resume {other.info.run_id}: not a training run \(the evaluate "
                                            r"stage's run\)"):
        run_train(spark, cfg_for(small), resume=other.info.run_id)


@pytest.mark.parametrize("precision,model", [("float16", "lenet5"), ("bfloat16", "mnist_cnn")])
def test_mixed_precision_trains_in_sync_and_registers_a_float32_model(spark, small, precision, model):
    """float16 (the GPU path: loss scaling around the Horovod optimizer, forced here on CPU) and bfloat16 (CPUs)."""
    # 3 epochs at a constant rate: one epoch (about 20 steps), or a cosine rate near 0 by the 3rd, leaves
    # val_accuracy too close to chance (0.1) for the bar. float16 is emulated on CPUs, so it trains lenet5, far
    # less compute than mnist_cnn.
    out = run_train(spark, cfg_for(small, f"train.mixed_precision={precision}", f"train.model={model}",
                                   "train.epochs=3", "train.schedule=constant"))
    assert out["precision"] == f"mixed_{precision}" and out["weights_in_sync"] and out["workers"] == 2
    assert out["metrics"]["val_accuracy"] > 0.3
    assert mlflow.get_run(out["run_id"]).data.tags["precision"] == f"mixed_{precision}"
    model = mlflow.tensorflow.load_model(out["model_uri"])
    assert {layer.dtype_policy.name for layer in model.layers if layer.weights} == {"float32"}  # served in float32
    probs = model.predict(np.zeros((2, 28, 28, 1), dtype=np.uint8), verbose=0)
    assert probs.dtype == np.float32 and np.allclose(probs.sum(axis=1), 1, atol=1e-4)


def test_class_weights_and_augmentation_train_in_sync_and_learn(spark, small):
    """Both change what every worker feeds its step (per-example loss weights; shifted and flipped images)."""
    # mnist_cnn has no BatchNorm, whose moving statistics after a few dozen steps make vgg_small's validation accuracy
    # swing; at 3x the default rate 6 epochs (about 110 steps) reach the flat part of its curve, where the default
    # rate left the last epoch still on the steep part: this asks whether the weighted, augmented feed learns
    out = run_train(spark, cfg_for(small, "train.model=mnist_cnn", "train.class_weights=true", "train.augment=true",
                                   "train.epochs=6", "train.schedule=constant", "train.learning_rate=0.003"))
    assert out["weights_in_sync"] and out["workers"] == 2
    assert out["metrics"]["val_accuracy"] > 0.55, out["metrics"]  # chance is 0.1
    params = mlflow.get_run(out["run_id"]).data.params
    assert params["train.class_weights"] == "True" and params["train.augment"] == "True"


def test_batch_norm_statistics_stay_identical_across_workers(spark, small):
    """BatchNorm moving statistics are not gradients: without averaging, the ranks' weights drift apart."""
    out = run_train(spark, cfg_for(small, "train.model=small_resnet", "train.width=0.25", "train.epochs=1"))
    assert out["weights_in_sync"] and out["workers"] == 2


@pytest.mark.fault('the training driver SIGKILLed (as by the OOM killer)', kind='fault',
                   shows='a resume while it trains is refused; after the kill the resume completes the same run')
def test_a_run_still_training_cannot_be_resumed_but_one_whose_driver_was_killed_can(spark, small):
    import signal

    proc, lines = train_in_a_subprocess(small, 50)
    run_id = lines[0].split("run ", 1)[1].split(":", 1)[0]
    try:
        with pytest.raises(PipelineError, match=rf"run {run_id} is being trained now by pid {proc.pid} on "):
            run_train(spark, cfg_for(small, "train.model=mnist_cnn", "train.epochs=50"), resume=run_id)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # as the kernel's OOM killer would: no handler runs, the run stays RUNNING
        proc.communicate(timeout=60)
    assert mlflow.get_run(run_id).info.status == "RUNNING"
    done = read_state(resolve_path(cfg_for(small).paths.checkpoints_root) / run_id).epoch
    resumed = run_train(spark, cfg_for(small, "train.model=mnist_cnn", f"train.epochs={done + 1}"), resume=run_id)
    assert resumed["run_id"] == run_id and resumed["epochs_run"] == done + 1
    assert mlflow.get_run(run_id).info.status == "FINISHED"


def test_early_stopping_registers_the_best_epochs_weights(spark, small):
    """Patience 1 stops at the first epoch whose val_loss does not improve, so the last epoch is never the best; with
    restore_best_weights the registered model is the best epoch's, and scores what that epoch scored."""
    import pyarrow.parquet as pq

    _, _, ingested = small
    # a constant high rate: with cosine decay val_loss can keep falling to the 12th epoch (seen once in CI)
    out = run_train(spark, cfg_for(small, "train.epochs=12", "train.learning_rate=0.01", "train.dropout=0",
                                   "train.schedule=constant",
                                   "train.early_stopping_patience=1", "train.restore_best_weights=true",
                                   "train.mixed_precision=off"))  # float32 in training, as in the registered model
    client = mlflow.MlflowClient()
    history = sorted(client.get_metric_history(out["run_id"], "val_loss"), key=lambda m: m.step)
    tracker = BestEpoch()  # "best" as the trainer counts it: an improvement of more than 1e-4
    for m in history:
        tracker.observe(m.step, m.value)
    best = tracker.epoch
    assert out["epochs_run"] == best + 2 < 12, [m.value for m in history]  # stopped one epoch after the best
    assert out["registered_epoch"] == best + 1
    run = client.get_run(out["run_id"])
    assert run.data.tags["registered_epoch"] == str(best + 1)
    val_acc = {m.step: m.value for m in client.get_metric_history(out["run_id"], "val_accuracy")}
    assert run.data.metrics["final_val_accuracy"] == pytest.approx(val_acc[best])
    # the registered model, scored here on the validation split, reproduces the best epoch's val_accuracy
    table = pq.read_table(f"{ingested['path']}/validation", columns=["image", "label"])
    images = np.stack([np.frombuffer(b, np.uint8) for b in table.column("image").to_pylist()]).reshape(-1, 28, 28, 1)
    model = mlflow.pyfunc.load_model(out["model_uri"])
    predicted = np.asarray(model.predict(images)).argmax(axis=1)
    accuracy = float((predicted == np.asarray(table.column("label").to_pylist())).mean())
    assert accuracy == pytest.approx(val_acc[best], abs=1.5 / len(images))


@pytest.mark.fault('a missing train.pretrained_weights file', kind='bad_input',
                   shows='refused before any worker starts, naming the key and the file')
def test_a_backbone_trains_its_head_from_a_weights_file_then_fine_tunes_across_a_resume(spark, tmp_path):
    """mobilenet_v2 on 32x32 crops of real photos, 2 workers: epoch 1 with the backbone frozen leaves it exactly as
    the weights file has it; the resumed epoch 2 trains it too, at finetune_lr_factor of the rate."""
    from pipelines.models.backbones import BACKBONE_NAME, new_backbone
    from tests.conftest import make_config
    from tests.fixtures import build_photo_classes

    build_photo_classes(tmp_path / "photos", per_class=24)
    weights = tmp_path / "mobilenet_v2_notop.h5"
    backbone = new_backbone("mobilenet_v2", 32, 32)
    rng = np.random.default_rng(1)  # not an initializer's weights
    backbone.set_weights([w + rng.normal(0, 0.01, w.shape).astype(w.dtype) for w in backbone.get_weights()])
    backbone.save_weights(str(weights))
    settings = ["ingest.name=photos", "ingest.source.type=folder", f"ingest.source.path={tmp_path / 'photos'}",
                "ingest.image.height=32", "ingest.image.width=32", "ingest.image.channels=3",
                "ingest.row_group_rows=4", "ingest.files_per_split=1", "ingest.split.test=0.1",
                "train.model=mobilenet_v2", f"train.pretrained_weights={weights}", "train.freeze_backbone_epochs=1",
                "train.num_proc=2", "train.batch_size=8", "train.schedule=constant", "train.warmup_epochs=0",
                "train.learning_rate=0.001", "train.finetune_lr_factor=0.1", "train.mixed_precision=off",
                "mlflow.registered_model=photos_classifier"]
    run_ingest(spark, make_config(tmp_path, *settings))
    with pytest.raises(PipelineError, match=r"train.pretrained_weights: no such file .*missing.h5"):
        run_train(spark, make_config(tmp_path, *settings, f"train.pretrained_weights={tmp_path}/missing.h5"))

    def backbone_weights(out):
        return mlflow.tensorflow.load_model(out["model_uri"]).get_layer(BACKBONE_NAME).get_weights()

    first = run_train(spark, make_config(tmp_path, *settings, "train.epochs=1"))
    assert first["weights_in_sync"]
    assert all(np.array_equal(a, b) for a, b in zip(backbone_weights(first), backbone.get_weights()))
    resumed = run_train(spark, make_config(tmp_path, *settings, "train.epochs=2"), resume=first["run_id"])
    assert resumed["weights_in_sync"] and resumed["epochs_run"] == 2
    changed = [not np.array_equal(a, b) for a, b in zip(backbone_weights(resumed), backbone.get_weights())]
    assert sum(changed) > len(changed) // 3  # the backbone trains once unfrozen (its BatchNorm statistics stay)
    rates = {m.step: m.value for m in mlflow.MlflowClient().get_metric_history(first["run_id"], "lr")}
    assert rates[0] == pytest.approx(0.002) and rates[1] == pytest.approx(0.0002)  # 2 workers x 0.001, then x 0.1
