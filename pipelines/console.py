"""What the user sees: one line per stage, library noise hidden unless --verbose, a JSON result last."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
import warnings
from typing import Any, Iterator

from pipelines.environment import is_verbose, set_verbose
from pipelines.secrets import redact


def quiet_libraries(verbose: bool) -> None:
    """Record --verbose, and unless it is set silence TensorFlow's C++ logs, pyarrow FutureWarnings from petastorm
    and chatty loggers. Must run before TensorFlow is imported."""
    set_verbose(verbose)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0" if verbose else "3")
    if not verbose:
        os.environ.setdefault("PYTHONWARNINGS", "ignore")
        os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
        warnings.filterwarnings("ignore")
        for name in ("pyspark", "mlflow", "petastorm", "horovod", "tensorflow", "absl", "alembic", "urllib3"):
            logging.getLogger(name).setLevel(logging.ERROR)
        # py4j's failed calls reach their caller as exceptions anyway; it also logs some of them on the root logger
        # (`logging.exception`), which prints tracebacks when a stop signal kills Spark's JVM before our handler runs.
        logging.getLogger("py4j").setLevel(logging.CRITICAL)
        logging.getLogger().addFilter(_not_from_py4j)
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "ERROR")


def _not_from_py4j(record: logging.LogRecord) -> bool:
    """A root-logger filter: drop the records py4j logs there instead of on its own logger."""
    return f"{os.sep}py4j{os.sep}" not in record.pathname


@contextlib.contextmanager
def hush() -> Iterator[None]:
    """Swallow what libraries print straight to stdout/stderr (progress bars, 'Created version ...'),
    unless --verbose."""
    if is_verbose():
        yield
        return
    import io

    sink = io.StringIO()
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        yield


def say(stage: str, message: str) -> None:
    """One readable line on stderr, so stdout's last line stays the JSON result."""
    print(redact(f"[{stage}] {message}"), file=sys.stderr, flush=True)


@contextlib.contextmanager
def step(stage: str, what: str) -> Iterator[dict[str, Any]]:
    """Time a step and print `[stage] what ... (12.3s)`; the yielded dict's 'note' is appended, and its 'seconds'
    holds the step's time once the step has ended."""
    info: dict[str, Any] = {}
    start = time.perf_counter()
    yield info
    took = info["seconds"] = time.perf_counter() - start
    note = f": {info['note']}" if info.get("note") else ""
    say(stage, f"{what}{note} ({took:.1f}s)")


def emit_result(result: dict[str, Any]) -> None:
    """The job's last stdout line: one JSON object with its outputs, for workflows and scripts."""
    print(redact(json.dumps(result, default=str, sort_keys=True)), flush=True)
