"""PySpark's Python daemon for local executors: Horovod's services on the loopback address (pipelines.loopback),
without the 3 s Horovod's task service waits after every run (pipelines.horovod_fixes) and, unless --verbose,
without Keras progress bars (pipelines.keras_quiet) or Horovod's traceback on a stopped training run, and with
the garbage collector's full pass after each task skipping what the worker's first task left (see
collect_then_freeze_once).

When a run is stopped (Ctrl-C, SIGTERM), Horovod's task service, which runs inside the executor's Python worker,
closes the output pipe of the training process it aborts while a thread is still forwarding that process's last
lines. The thread dies with "RuntimeError: Pipe is closed" (horovod/runner/util/streams.py) and Python prints its
traceback; in local mode the executors share the user's terminal, so each stop printed two tracebacks. Spark starts
this module instead of `pyspark.daemon` (`spark.python.daemon.module`, set for local masters); without --verbose it
drops that one exception and prints every other thread error as before.
"""
from __future__ import annotations

import gc
import threading
import traceback
from types import SimpleNamespace
from typing import Any

from pipelines.environment import is_verbose
from pipelines.horovod_fixes import start_command_lifetime_at_launch
from pipelines.keras_quiet import quiet_keras_progress_bars
from pipelines.loopback import bind_if_asked

_print_thread_error = threading.excepthook


def is_closed_pipe(exc_type: type, exc: BaseException | None, tb: Any) -> bool:
    """True for Horovod's "Pipe is closed" raised in its output-forwarding stream (a stop, not a failure)."""
    if exc_type is not RuntimeError or str(exc) != "Pipe is closed" or tb is None:
        return False
    last = traceback.extract_tb(tb)[-1]
    return last.filename.replace("\\", "/").endswith("horovod/runner/util/streams.py")


def _thread_error(args: threading.ExceptHookArgs) -> None:
    if not is_closed_pipe(args.exc_type, args.exc_value, args.exc_traceback):
        _print_thread_error(args)


_frozen = False


def collect_then_freeze_once() -> int:
    """PySpark's daemon runs a full gc.collect() in a worker after every task it runs. That pass walks every object
    the worker holds: the modules it imported (pandas, pyarrow, TensorFlow) and what it keeps between tasks (a loaded
    model), tens of milliseconds a task without TensorFlow and over a hundred with it. After the first task's pass
    the survivors are frozen (gc.freeze: left out of later passes, still freed by reference counting), so later
    passes walk only what later tasks made."""
    global _frozen
    collected = gc.collect()
    if not _frozen:
        gc.freeze()
        _frozen = True
    return collected


if not is_verbose():
    threading.excepthook = _thread_error  # inherited by the workers the daemon forks
    quiet_keras_progress_bars()
bind_if_asked()  # before the daemon forks its workers, which run Horovod's task services
start_command_lifetime_at_launch()

if __name__ == "__main__":
    import pyspark.daemon

    pyspark.daemon.gc = SimpleNamespace(collect=collect_then_freeze_once)  # the one gc call the daemon makes
    pyspark.daemon.manager()
