"""`sparkvision ui`: the MLflow UI on the configured store, on 127.0.0.1, stopped whole by Ctrl-C or SIGTERM.

`mlflow ui` starts a uvicorn server (and, by default, a job runner with huey consumer processes for GenAI jobs this
project does not use); a signal to the `mlflow` process alone leaves them running and holding the port. Here the
server runs in a session of its own without the job runner, and a stop ends that whole session.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from pipelines.config import Config, resolve_path
from pipelines.console import say
from pipelines.environment import child_env, is_verbose
from pipelines.errors import PipelineError
from pipelines.inference.serve import check_port_free
from pipelines.signals import Stopped, call_on_signals
from pipelines.tracking import tracking_uri

HOST = "127.0.0.1"


def ui_command_line(store: str, port: int, verbose: bool) -> list[str]:
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", store, "--host", HOST, "--port", str(port)]
    return cmd if verbose else [*cmd, "--uvicorn-opts", "--log-level warning"]  # uvicorn's INFO lines: --verbose


def wait_until_listening(proc: subprocess.Popen, port: int, log: Path, stopped: list[int],
                         timeout_s: float = 120) -> None:
    """Return once the server accepts connections (or a stop signal arrived); a clear error (with its log) if it
    exits or never listens."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not stopped:
        if proc.poll() is not None:
            raise PipelineError(f"the MLflow UI exited with code {proc.returncode}; its log: {log}")
        with socket.socket() as probe:
            if probe.connect_ex((HOST, port)) == 0:
                return
        time.sleep(0.3)
    if stopped:
        return
    raise PipelineError(f"the MLflow UI did not listen on {HOST}:{port} within {timeout_s:.0f}s; its log: {log}")


def stop_session(proc: subprocess.Popen, grace_s: float = 10) -> None:
    """SIGTERM to the server's whole session (uvicorn and its workers), SIGKILL to what is left after `grace_s`."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            continue
        if not _session_alive(proc.pid):
            return


def _session_alive(sid: int) -> bool:
    out = subprocess.run(["ps", "-o", "pid=", "-s", str(sid)], capture_output=True, text=True).stdout
    return bool(out.strip())


def experiment_page(cfg: Config, store: str, port: int) -> str:
    """Where the project's experiment opens on its training runs. MLflow 3.17's UI keeps a GenAI / Model training
    switch per browser (GenAI unless chosen), which wins over the experiment's kind tag; the URL can choose it."""
    from mlflow import MlflowClient

    exp = MlflowClient(tracking_uri=store).get_experiment_by_name(cfg.mlflow.experiment)
    if exp is None:
        return f"no runs yet in experiment {cfg.mlflow.experiment}"
    return (f"training runs: http://{HOST}:{port}/#/experiments/{exp.experiment_id}?workflowType=machine_learning")


def run_ui(cfg: Config, port: int) -> int:
    """Serve the UI until Ctrl-C or SIGTERM; exits 130 / 143 with nothing of it left running."""
    store = tracking_uri(cfg)
    check_port_free(HOST, port)
    log = resolve_path(cfg.paths.runs_root) / "mlflow-ui.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as out:
        proc = subprocess.Popen(ui_command_line(store, port, is_verbose()), start_new_session=True,
                                stdout=None if is_verbose() else out, stderr=None if is_verbose() else out,
                                env=child_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"))
    try:
        with call_on_signals(lambda _signum: None) as received:
            wait_until_listening(proc, port, log, received)
            if not received:
                say("ui", f"MLflow UI on http://{HOST}:{port} (store {store}); {experiment_page(cfg, store, port)}; "
                          f"Ctrl-C stops it")
            while proc.poll() is None and not received:
                time.sleep(0.2)
    finally:
        stop_session(proc)
    if received:
        raise Stopped(received[0])
    raise PipelineError(f"the MLflow UI exited with code {proc.returncode}; its log: {log}")
