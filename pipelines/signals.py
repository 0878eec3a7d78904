"""Stopping a job with SIGTERM or SIGINT (a workflow task's timeout or cancel, a scheduler, Ctrl-C): the job unwinds,
its MLflow run ends KILLED instead of staying RUNNING, nothing is half-published, and it exits 128 + the signal."""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from contextlib import contextmanager
from typing import Callable, Iterator

from pipelines.environment import is_verbose

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def signal_name(signum: int | None) -> str:
    """SIGTERM, SIGINT, ...; a KeyboardInterrupt with no signal recorded is Ctrl-C, SIGINT."""
    return signal.Signals(signum or signal.SIGINT).name


class Stopped(BaseException):
    """The job was told to stop. A BaseException, like KeyboardInterrupt, so that no `except Exception` swallows it."""

    def __init__(self, signum: int, detail: str = ""):
        self.signum = signum
        super().__init__(f"stopped by {signal_name(signum)}" + (f": {detail}" if detail else ""))

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


_requested: list[int] = []  # the stop signals this process has received
_on_stop: dict[str, Callable[[], None]] = {}  # what to start when a stop signal arrives, by name


def on_stop(name: str, action: Callable[[], None]) -> None:
    """Run `action` in its own thread when a stop signal arrives (cancel the Spark jobs in flight, so the job unwinds
    at once instead of waiting for them). Its own thread: the main thread may be inside a py4j call, and py4j calls
    from a signal handler fail as reentrant. Errors in `action` are ignored: the job is stopping anyway."""
    _on_stop[name] = action


def _start_stop_actions() -> None:
    for action in list(_on_stop.values()):
        threading.Thread(target=_ignoring_errors, args=(action,), daemon=True, name="sparkvision-stop").start()


def _ignoring_errors(action: Callable[[], None]) -> None:
    try:
        action()
    except Exception:
        pass


def stop_requested() -> int | None:
    """The first stop signal received, if any. With the whole process group signalled (a workflow task's timeout,
    Ctrl-C), Spark's JVM dies too, and the error that reaches the job can be py4j's, not Stopped."""
    return _requested[0] if _requested else None


def _raise_stopped(signum: int, _frame: object) -> None:
    _requested.append(signum)
    if not is_verbose():
        logging.getLogger().setLevel(logging.CRITICAL)  # py4j logs every call the dying JVM refuses, at ERROR
    _start_stop_actions()
    raise Stopped(signum)


_raise_stopped.sparkvision_stop = True  # type: ignore[attr-defined]


@contextmanager
def _handled_by(handler: Callable[[int, object], None]) -> Iterator[None]:
    """`handler` for SIGTERM and SIGINT while the block runs, then the previous handlers again. Only the main thread
    can set handlers; elsewhere nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, previous in saved.items():
            signal.signal(s, previous)


def stop_on_signals() -> contextlib.AbstractContextManager[None]:
    """While the block runs, SIGTERM and SIGINT raise Stopped in the main thread."""
    return _handled_by(_raise_stopped)


@contextmanager
def call_on_signals(action: Callable[[int], None]) -> Iterator[list[int]]:
    """While the block runs, SIGTERM and SIGINT call `action(signum)` (cancel the work in flight) instead of raising;
    the list holds the signals received."""
    received: list[int] = []

    def handler(signum: int, _frame: object) -> None:
        received.append(signum)
        action(signum)

    handler.sparkvision_stop = True  # type: ignore[attr-defined]
    with _handled_by(handler):
        yield received


@contextmanager
def keep_stop_handlers() -> Iterator[None]:
    """Put this module's stop handlers back if the block replaced them. PySpark's SparkContext takes SIGINT for itself:
    Ctrl-C then cancels all jobs from inside the py4j call in progress, where py4j prints a reentrant-call traceback
    for each. A job under stop_on_signals unwinds cleanly instead. Other handlers (a notebook's) are left to PySpark."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, handler in saved.items():
            if getattr(handler, "sparkvision_stop", False) and signal.getsignal(s) is not handler:
                signal.signal(s, handler)


class SignalWatch:
    """Which stop signal arrived during a block, whoever handled it, and the process's handlers put back after it.

    Horovod's launcher installs its own SIGTERM/SIGINT handlers (they stop the workers, and the launch then fails
    like any worker failure) and leaves them installed. Python writes every signal it handles to the wakeup fd, so
    the job can still tell "stopped" from "failed"."""

    def __init__(self) -> None:
        self._read = self._write = -1
        self._saved: dict[int, object] = {}
        self._previous_fd = -1
        self._seen: list[int] = []

    def __enter__(self) -> "SignalWatch":
        if threading.current_thread() is threading.main_thread():
            self._saved = {s: signal.getsignal(s) for s in STOP_SIGNALS}
            self._read, self._write = os.pipe()
            os.set_blocking(self._read, False)
            os.set_blocking(self._write, False)
            self._previous_fd = signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        return self

    def received(self) -> int | None:
        """The first stop signal that arrived inside the block so far, or None."""
        if self._read >= 0:
            try:
                new = [b for b in os.read(self._read, 256) if b in STOP_SIGNALS]
            except BlockingIOError:
                new = []
            self._seen.extend(new)
            _requested.extend(new)
        return self._seen[0] if self._seen else None

    def __exit__(self, *exc: object) -> None:
        if self._read < 0:
            return
        self.received()
        signal.set_wakeup_fd(self._previous_fd)
        for s, handler in self._saved.items():
            if handler is not None:  # None: a handler not set from Python, which cannot be put back
                signal.signal(s, handler)
        os.close(self._read)
        os.close(self._write)
        self._read = -1
