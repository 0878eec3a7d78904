"""`sparkvision ui`: a real MLflow UI on 127.0.0.1 that a stop leaves nothing of."""
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import psutil
import pytest

from tests.fixtures import is_loopback, listening_addresses


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.fault('what `sparkvision ui` listens on, and its stop ({sig})', kind='security',
                   shows='127.0.0.1 only; every process it started ends')
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_the_ui_serves_the_store_and_a_stop_ends_every_process_it_started(tmp_path, sig):
    port = free_port()
    store = f"sqlite:///{tmp_path}/mlflow.db"
    subprocess.run([sys.executable, "-c", "import sys; from pipelines import tracking; from pipelines.config import "
                    "load_config; tracking.configure(load_config([], [f'mlflow.tracking_uri={sys.argv[1]}', "
                    "f'mlflow.artifact_location={sys.argv[2]}']))", store, str(tmp_path / 'artifacts')],
                   check=True)  # the experiment a job creates
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "ui", "--port", str(port), "--set",
                             f"mlflow.tracking_uri={store}", "--set", f"paths.runs_root={tmp_path}/runs"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = proc.stderr.readline()
        assert first == (f"[ui] MLflow UI on http://127.0.0.1:{port} (store {store}); training runs: http://127.0.0.1:"
                         f"{port}/#/experiments/1?workflowType=machine_learning; Ctrl-C stops it\n")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=30) as answer:
            assert answer.status == 200
        started = psutil.Process(proc.pid).children(recursive=True)
        listening = listening_addresses(proc.pid)
        assert ("127.0.0.1", port) in listening and all(is_loopback(ip) for ip, _ in listening), listening
        assert any("uvicorn" in " ".join(p.cmdline()) for p in started)
        assert not any("huey" in " ".join(p.cmdline()) for p in started)  # no GenAI job runner
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + sig and out == ""
    assert err == f"stopped by {signal.Signals(sig).name}\n"  # uvicorn's INFO lines only with --verbose
    deadline = time.monotonic() + 10
    while any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in started) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [p.pid for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    with socket.socket() as s:  # the port is free again: nothing listens on it
        # SO_REUSEADDR, as every server sets it: the connection the health check made may linger in TIME_WAIT on the
        # server's side, which refuses a plain bind though no process holds the port (seen once in CI)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen()


def test_a_taken_port_is_one_sentence(tmp_path):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "pipelines.cli", "ui", "--port", str(port), "--set",
                               f"mlflow.tracking_uri=sqlite:///{tmp_path}/m.db"], capture_output=True, text=True,
                              timeout=120)
    assert done.returncode == 1
    assert done.stderr == f"error: cannot serve on 127.0.0.1:{port}: address already in use (choose another --port)\n"
