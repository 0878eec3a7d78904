"""Progress of long work (decoding a large folder, a long training epoch): done of total, rate and time left, on one
line rewritten in place on a terminal, or a plain line every `log_every` seconds in a log; nothing at all for work
that ends within `after` seconds."""
from __future__ import annotations

import contextlib
import sys
import threading
import time
from typing import Iterator, TextIO

from pipelines.console import say
from pipelines.secrets import redact


def progress_text(what: str, done: int, total: int, seconds: float, unit: str) -> str:
    """'epoch 3/8: 120/450 steps (27%), 4.1 steps/s, 1m20s left'."""
    rate = done / seconds if seconds > 0 else 0.0
    left = f", {_duration((total - done) / rate)} left" if rate > 0 and done < total else ""
    return f"{what}: {done}/{total} {unit} ({100 * done / max(total, 1):.0f}%), {rate:.1f} {unit}/s{left}"


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds + 0.5), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class ProgressLine:
    """One stage's progress line."""

    def __init__(self, stage: str, after: float = 10.0, log_every: float = 30.0, stream: TextIO | None = None):
        self.stage, self.after, self.log_every = stage, after, log_every
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.started = time.monotonic()
        self.last_logged = self.started
        self.showing = False

    def update(self, text: str) -> None:
        now = time.monotonic()
        if now - self.started < self.after:
            return
        if self.tty:
            self.stream.write(f"\r\x1b[K{redact(f'[{self.stage}] {text}')}")
            self.stream.flush()
            self.showing = True
        elif now - self.last_logged >= self.log_every:
            say(self.stage, text)
            self.last_logged = now

    def restart(self) -> None:
        """New work begins (the next epoch): clear the line, wait `after` seconds again."""
        self.clear()
        self.started = self.last_logged = time.monotonic()

    def clear(self) -> None:
        if self.showing:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self.showing = False


@contextlib.contextmanager
def spark_task_progress(spark, stage: str, what: str, poll_seconds: float = 1.0, after: float = 10.0,
                        log_every: float = 30.0) -> Iterator[None]:
    """While the block runs Spark jobs: their tasks done of total, from Spark's status tracker."""
    tracker = spark.sparkContext.statusTracker()
    line, done = ProgressLine(stage, after, log_every), threading.Event()
    started = time.monotonic()

    def watch() -> None:
        while not done.wait(poll_seconds):
            stages = [tracker.getStageInfo(i) for i in tracker.getActiveStageIds()]
            stages = [s for s in stages if s is not None]
            total = sum(s.numTasks for s in stages)
            if total:
                line.update(progress_text(what, sum(s.numCompletedTasks for s in stages), total,
                                          time.monotonic() - started, "tasks"))

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join(timeout=5)
        line.clear()
