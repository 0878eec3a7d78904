"""Online scoring: a registered model behind MLflow's REST scoring server (`/ping`, `POST /invocations`).

The same server `mlflow models serve --env-manager local` starts, run in this process so that it is quiet by
default (no per-request Keras progress bar or access log) and stops on SIGTERM/Ctrl-C like the other commands.
"""
from __future__ import annotations

import os
import sys
import tempfile

from pipelines import tracking
from pipelines.config import Config
from pipelines.errors import PipelineError
from pipelines.inference.job import default_model_uri
from pipelines.inference.models import resolve_model
from pipelines.signals import Stopped, call_on_signals


def serve_model(cfg: Config, model_uri: str | None, host: str, port: int, verbose: bool) -> int:
    """Serve `model_uri` (default: infer.model_uri, else the champion) until stopped; returns the exit code."""
    import mlflow
    import uvicorn
    from mlflow.pyfunc import scoring_server

    from pipelines.console import hush

    check_port_free(host, port)
    tracking.configure(cfg)
    uri = model_uri or default_model_uri(cfg)
    model = resolve_model(uri)  # a missing model or alias is one clear sentence, before anything starts
    local_copy = tempfile.TemporaryDirectory(prefix="sparkvision-serve-")  # removed when the server stops
    with hush():
        local_path = mlflow.artifacts.download_artifacts(model.load_uri, dst_path=local_copy.name)
    # What `mlflow models serve` does: the scoring app reads the model's local path from this variable.
    os.environ[scoring_server._SERVER_MODEL_PATH] = local_path
    if not verbose:  # pyfunc's predict would draw a Keras progress bar per request
        from tf_keras.src.utils import keras_logging

        keras_logging.INTERACTIVE_LOGGING_DEFAULT = False  # requests run in worker threads: the switch is per thread
    shape = "x".join(map(str, model.shape))
    what = f"version {model.version} of {model.name}" if model.version else model.load_uri
    print(f"[serve] {uri} ({what}) on http://{host}:{port}: POST /invocations "
          f'{{"inputs": <uint8 pixels, n x {shape}>}} returns class probabilities in the order of '
          f"{', '.join(model.label_names[:3])}, ...; Ctrl-C stops it", file=sys.stderr)
    # uvicorn shuts down gracefully on SIGINT/SIGTERM, then raises the signal again for the handler it found: only
    # record it there, and stop like every command does once the server is down (raising inside uvicorn prints traces)
    with local_copy, call_on_signals(lambda _signum: None) as received:
        uvicorn.run("mlflow.pyfunc.scoring_server.app:app", host=host, port=port, workers=1,
                    log_level="info" if verbose else "warning")
    if received:
        raise Stopped(received[0])
    return 0


def check_port_free(host: str, port: int) -> None:
    """A clear error before loading anything when the address is taken (uvicorn would log it and exit 3)."""
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a closing socket is no conflict
        try:
            probe.bind((host, port))
        except OSError as exc:
            reason = (exc.strerror or str(exc)).lower()
            raise PipelineError(f"cannot serve on {host}:{port}: {reason} (choose another --port)") from exc
