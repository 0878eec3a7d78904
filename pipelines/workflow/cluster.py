"""`sparkvision cluster up|down|status`: a real Spark standalone cluster (master + N workers, started with
spark-class) and an MLflow tracking server, all bound to the configured host (127.0.0.1 by default).
PIDs and logs live in cluster.state_dir, so `down` stops exactly what `up` started."""
from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from pipelines.config import ClusterConfig, Config, ConfigError, resolve_path
from pipelines.console import emit_result, say
from pipelines.environment import child_env
from pipelines.errors import PipelineError


def spark_home() -> Path:
    import pyspark

    return Path(os.environ.get("SPARK_HOME") or Path(pyspark.__file__).parent)


def _wait_port(host: str, port: int, seconds: float, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise PipelineError(f"process exited early (code {proc.returncode}); see {log}")
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.5)
    raise PipelineError(f"nothing listens on {host}:{port} after {seconds:.0f}s; see {log}")


def _start(name: str, cmd: list[str], state: Path, env: dict[str, str]) -> tuple[subprocess.Popen, Path]:
    log = state / f"{name}.log"
    fh = open(log, "w")
    proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    return proc, log


def _alive(pid: int) -> bool:
    """Running (a zombie is not: it is reaped here when it is our own child)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def cluster_up(cfg: Config, workers: int | None = None) -> dict:
    c = cfg.cluster
    state = resolve_path(c.state_dir)
    pid_file = state / "pids.json"
    if pid_file.exists() and any(_alive(p["pid"]) for p in json.loads(pid_file.read_text()).values()):
        raise PipelineError(f"a cluster from {pid_file} is still running: `sparkvision cluster down` first")
    state.mkdir(parents=True, exist_ok=True)
    home = spark_home()
    spark_class = str(home / "bin" / "spark-class")
    env = child_env(SPARK_HOME=str(home), SPARK_LOCAL_IP=c.host, SPARK_MASTER_HOST=c.host,
                    PYSPARK_PYTHON=sys.executable, SPARK_WORKER_DIR=str(state / "work"))
    started: dict[str, dict] = {}

    def record(name: str, proc: subprocess.Popen, log: Path) -> None:
        started[name] = {"pid": proc.pid, "log": str(log)}
        pid_file.write_text(json.dumps(started, indent=2))

    try:
        proc, log = _start("master", [spark_class, "org.apache.spark.deploy.master.Master", "--host", c.host,
                                      "--port", str(c.master_port), "--webui-port", str(c.master_webui_port)], state, env)
        record("master", proc, log)
        _wait_port(c.host, c.master_port, 60, proc, log)
        master = f"spark://{c.host}:{c.master_port}"
        for i in range(workers or c.workers):
            proc, log = _start(f"worker{i + 1}", [spark_class, "org.apache.spark.deploy.worker.Worker", master,
                                                  "--host", c.host, "--cores", str(c.worker_cores),
                                                  "--memory", c.worker_memory, "--webui-port", "0",
                                                  "--work-dir", str(state / "work")], state, env)
            record(f"worker{i + 1}", proc, log)
        backend = f"sqlite:///{state / 'mlflow.db'}"
        auth, server_env = tracking_auth(c, state, env)
        proc, log = _start("mlflow", [sys.executable, "-m", "mlflow", "server", "--host", c.host,
                                      "--port", str(c.mlflow_port), "--backend-store-uri", backend,
                                      "--artifacts-destination", str(state / "mlartifacts"),
                                      "--serve-artifacts", "--workers", "1", *auth], state, server_env)
        record("mlflow", proc, log)
        _wait_port(c.host, c.mlflow_port, 120, proc, log)
        _wait_workers(c.host, c.master_webui_port, workers or c.workers, 60)
    except BaseException:
        cluster_down(cfg)
        raise
    info = {"master": master, "master_ui": f"http://{c.host}:{c.master_webui_port}",
            "mlflow": f"http://{c.host}:{c.mlflow_port}", "mlflow_auth": c.mlflow_auth, "workers": workers or c.workers,
            "state_dir": str(state), "pids": {k: v["pid"] for k, v in started.items()}}
    (state / "cluster.json").write_text(json.dumps(info, indent=2))
    return info


def tracking_auth(c: ClusterConfig, state: Path, env: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """With cluster.mlflow_auth: MLflow's basic-auth app, its admin the MLFLOW_TRACKING_USERNAME/PASSWORD of the
    environment (what every job and worker sends), its users in the state folder, a fresh Flask secret per start.
    Returns the server's extra arguments and its environment."""
    if not c.mlflow_auth:
        return [], env
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if not user or not password:
        raise ConfigError("cluster.mlflow_auth needs MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD in the "
                          "environment: the tracking server's admin, and what jobs and workers log in with")
    ini = state / "mlflow_auth.ini"
    ini.write_text(f"[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///{state / 'mlflow_auth.db'}\n"
                   f"admin_username = {user}\n"
                   "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    return ["--app-name", "basic-auth"], {**env, "MLFLOW_AUTH_CONFIG_PATH": str(ini),
                                          "MLFLOW_AUTH_ADMIN_PASSWORD": password,
                                          "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(32)}


def _wait_workers(host: str, ui_port: int, expected: int, seconds: float) -> None:
    """The master's JSON status must list every worker ALIVE."""
    import urllib.request

    deadline = time.monotonic() + seconds
    alive = 0
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://{host}:{ui_port}/json/", timeout=2) as resp:
                status = json.load(resp)
            alive = sum(1 for w in status.get("workers", []) if w.get("state") == "ALIVE")
            if alive >= expected:
                return
        except OSError:
            pass
        time.sleep(1)
    raise PipelineError(f"only {alive} of {expected} Spark workers registered with the master in {seconds:.0f}s")


def cluster_down(cfg: Config) -> dict:
    state = resolve_path(cfg.cluster.state_dir)
    pid_file = state / "pids.json"
    if not pid_file.exists():
        return {"stopped": []}
    procs = json.loads(pid_file.read_text())
    stopped = []
    for name, p in reversed(list(procs.items())):
        pid = p["pid"]
        if _alive(pid):
            try:
                os.killpg(pid, signal.SIGTERM)
            except OSError:
                pass
            stopped.append(name)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(_alive(p["pid"]) for p in procs.values()):
        time.sleep(0.5)
    for p in procs.values():
        if _alive(p["pid"]):
            try:
                os.killpg(p["pid"], signal.SIGKILL)
            except OSError:
                pass
    pid_file.unlink()
    return {"stopped": stopped}


def cluster_command(args: argparse.Namespace, cfg: Config) -> int:
    if args.action == "up":
        info = cluster_up(cfg, args.workers)
        say("cluster", f"Spark master {info['master']} (UI {info['master_ui']}), {info['workers']} workers, "
                       f"MLflow {info['mlflow']}" + (" (login required: MLFLOW_TRACKING_USERNAME / PASSWORD)"
                                                     if info["mlflow_auth"] else "") + f"; logs in {info['state_dir']}")
        emit_result(info)
    elif args.action == "down":
        out = cluster_down(cfg)
        say("cluster", f"stopped {', '.join(out['stopped']) or 'nothing (no cluster running)'}")
        emit_result(out)
    else:
        state = resolve_path(cfg.cluster.state_dir)
        pid_file = state / "pids.json"
        procs = json.loads(pid_file.read_text()) if pid_file.exists() else {}
        status = {k: ("running" if _alive(v["pid"]) else "dead") for k, v in procs.items()}
        say("cluster", ", ".join(f"{k} {v}" for k, v in status.items()) or "no cluster")
        emit_result({"processes": status})
    return 0
