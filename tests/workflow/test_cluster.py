"""Cluster mode for real: a Spark standalone master, 2 workers and an MLflow tracking server on 127.0.0.1, the
whole workflow through spark-submit, then the registered model and predictions are checked; everything is torn
down, also when something fails."""
import json
import os
import re
import socket
import subprocess
import sys
import threading
from datetime import datetime, timezone
import urllib.error
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipelines.config import load_config
from pipelines.ingest.job import run_ingest
from pipelines.workflow.cluster import _alive, cluster_down, cluster_up
from tests.conftest import make_config
from tests.fixtures import is_loopback, listening_addresses, write_idx_slice

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_once_logged(log_glob: str, line: str, runs: Path, is_target, killed: dict) -> None:
    """SIGKILL the first process `is_target(process)` accepts once the workflow task log matching `log_glob` under
    `runs` holds `line`; its pid and time go into `killed`."""
    import time

    import psutil

    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        logs = list(runs.glob(log_glob))
        if logs and line in logs[0].read_text(errors="replace"):
            break
        time.sleep(0.1)
    while time.monotonic() < deadline:
        for p in psutil.process_iter(["pid", "cmdline"]):
            try:
                if is_target(p):
                    p.kill()
                    killed.update(pid=p.info["pid"], at=datetime.now(timezone.utc))
                    return
            except psutil.Error:
                continue  # it ended while being looked at
        time.sleep(0.05)


def kill_an_executor_mid_ingest(runs: Path, killed: dict) -> None:
    """SIGKILL the first executor JVM once the workflow's ingest has listed its source (it is decoding now)."""
    kill_once_logged("workflows/*/*/ingest.attempt1.log", "[ingest] listing", runs,
                     lambda p: "CoarseGrainedExecutorBackend" in " ".join(p.info["cmdline"] or []), killed)


def kill_a_training_worker_mid_run(runs: Path, killed: dict) -> None:
    """SIGKILL Horovod rank 0 once the workflow's train task has printed its first epoch (elastic mode goes on: the
    survivor becomes rank 0)."""
    kill_once_logged("workflows/*/*/train.attempt1.log", "[train] epoch 1/", runs,
                     lambda p: "gloo_exec_fn" in " ".join(p.info["cmdline"] or [])
                     and p.environ().get("HOROVOD_RANK") == "0", killed)


@pytest.mark.fault('a Spark executor JVM SIGKILLed during ingest on the standalone cluster', kind='fault',
                   shows='Spark retries the tasks; the published version has the digest of an undisturbed run')
@pytest.mark.fault('training worker rank 0 SIGKILLed mid-run in elastic mode on the standalone cluster', kind='fault',
                   shows='the job never restarts: one train attempt, no restart tag, every epoch logged once, '
                         'FINISHED and promoted')
@pytest.mark.fault('what `sparkvision cluster up` listens on, with cluster.mlflow_auth', kind='security',
                   shows='master, workers and tracking server on 127.0.0.1 (cluster.host); a request without '
                         'credentials is refused (401); the whole workflow runs logged in')
def test_whole_workflow_on_a_standalone_cluster_with_an_mlflow_server(tmp_path, monkeypatch, spark, observe):
    killed, killed_worker = {}, {}
    # the tracking server requires a login; every job and worker sends these (MLflow reads them from the environment)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "sparkvision-admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "not-a-real-secret-42")
    ports = {"master": free_port(), "ui": free_port(), "mlflow": free_port()}
    src = write_idx_slice(tmp_path / "idx", train=1500, test=300)
    overrides = [
        f"cluster.state_dir={tmp_path}/cluster", f"cluster.master_port={ports['master']}",
        f"cluster.master_webui_port={ports['ui']}", f"cluster.mlflow_port={ports['mlflow']}",
        "cluster.worker_memory=2g", "cluster.mlflow_auth=true",
        f"spark.master=spark://127.0.0.1:{ports['master']}", "spark.executor_memory=1500m", "spark.driver_memory=2g",
        f"mlflow.tracking_uri=http://127.0.0.1:{ports['mlflow']}",
        f"paths.datasets_root={tmp_path}/shared/datasets", f"paths.checkpoints_root={tmp_path}/shared/checkpoints",
        f"paths.runs_root={tmp_path}/runs", f"paths.predictions_root={tmp_path}/shared/predictions",
        f"ingest.source.path={src}", "ingest.row_group_rows=150", "ingest.files_per_split=2",
        # elastic training, in batches of 8: epochs long enough to lose a worker inside one
        "train.model=mnist_cnn", "train.epochs=3", "train.batch_size=8", "train.warmup_epochs=0", "train.width=0.5",
        "train.elastic=true", "train.elastic_commit_steps=10", "evaluate.threshold=0.3",
    ]
    cfg = make_config(tmp_path, *overrides)
    info = cluster_up(cfg)
    pids = list(info["pids"].values())
    try:
        assert info["workers"] == 2 and len(pids) == 4  # master, 2 workers, MLflow server
        for pid in pids:  # their RPC ports, web UIs and the tracking server: on cluster.host, 127.0.0.1 here
            listening = listening_addresses(pid)
            assert listening and all(is_loopback(ip) for ip, _ in listening), listening
        with pytest.raises(urllib.error.HTTPError) as refused:  # no credentials, no access
            urllib.request.urlopen(f"http://127.0.0.1:{ports['mlflow']}/api/2.0/mlflow/experiments/search"
                                   "?max_results=1", timeout=30)
        assert refused.value.code == 401
        cmd = [sys.executable, "-m", "pipelines.cli", "workflow", "run", str(ROOT / "jobs/workflows/fashion_mnist.yaml"),
               "--conf", str(ROOT / "conf/cluster.yaml"), *[x for o in overrides for x in ("--set", o)]]
        killer = threading.Thread(target=kill_an_executor_mid_ingest, args=(tmp_path / "runs", killed), daemon=True)
        killer.start()
        worker_killer = threading.Thread(target=kill_a_training_worker_mid_run, args=(tmp_path / "runs", killed_worker),
                                         daemon=True)
        worker_killer.start()
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=1500,
                             env={**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"})
        assert res.returncode == 0, res.stderr[-3000:]
        run = json.loads(res.stdout.strip().splitlines()[-1])
        values = {k: v["values"] for k, v in run["tasks"].items()}
        # the executor killed while ingest decoded: Spark ran its tasks again, and the version is the one an
        # undisturbed ingest of the same source publishes
        assert killed.get("pid"), "no executor was killed during ingest"
        record = json.loads((Path(run["tasks"]["ingest"]["log"]).parent / "record.json").read_text())
        ingest = record["tasks"]["ingest"]
        assert ingest["status"] == "SUCCESS" and len(ingest["attempts"]) == 1  # no retry of the task: Spark's own
        assert killed["at"] < datetime.fromisoformat(ingest["attempts"][0]["ended"])  # killed before ingest ended
        local = load_config([ROOT / "conf/cluster.yaml"], [*overrides, "spark.master=local[2]",
                                                            f"paths.datasets_root={tmp_path}/undisturbed"])
        assert run_ingest(spark, local)["content_digest"] == values["ingest"]["content_digest"]
        observe(**{"executor SIGKILLed during ingest": f"pid {killed['pid']}", "ingest": "SUCCESS, digest equal to "
                   "an undisturbed run's", "workflow": run["status"]})
        # a training worker killed mid-run: elastic mode went on without a relaunch or a retry of the task
        assert killed_worker.get("pid"), "no training worker was killed"
        assert len(record["tasks"]["train"]["attempts"]) == 1
        assert values["train"]["workers"] in (1, 2)  # 2 when the worker Spark ran again rejoined before the end
        observe(**{"training worker SIGKILLed": f"rank 0, pid {killed_worker['pid']}", "train attempts": 1,
                   "workers at the end": values["train"]["workers"]})
        assert values["evaluate"]["decision"] == "champion"

        from mlflow import MlflowClient

        server = f"http://127.0.0.1:{ports['mlflow']}"
        client = MlflowClient(tracking_uri=server, registry_uri=server)  # not the global URI of earlier tests
        champion = client.get_model_version_by_alias(cfg.mlflow.registered_model, "champion")
        assert str(champion.version) == values["train"]["version"]
        train_run = client.get_run(values["train"]["run_id"])
        assert train_run.data.tags["spark_master"] == f"spark://127.0.0.1:{ports['master']}"
        assert sorted(m.step for m in client.get_metric_history(values["train"]["run_id"], "val_accuracy")) == [0, 1, 2]
        assert train_run.info.status == "FINISHED" and not any(k.startswith("restart_") for k in train_run.data.tags)
        rings = re.findall(r"sparkvision elastic: (\d+) worker\(s\) from epoch (\d+), step (\d+)",
                           (tmp_path / "shared/checkpoints" / values["train"]["run_id"] / "workers.log").read_text())
        assert len(rings) >= 2, rings  # the first ring, and at least one formed again after the loss
        observe(**{"rings (workers, from epoch, step)": [tuple(int(x) for x in r) for r in rings]})
        preds = pq.read_table(values["infer"]["output"]).to_pandas()
        assert len(preds) == values["infer"]["rows_scored"] == values["evaluate"]["rows"]
        assert set(preds["model_version"]) == {values["train"]["version"]}
    finally:
        cluster_down(cfg)
    assert not any(_alive(p) for p in pids)
