"""A study's or an experiment's child runs as they end: one line each on stderr, and none left RUNNING when the
job is stopped."""
from __future__ import annotations

import contextlib
import threading
import time
from typing import Any, Callable, Iterator

from pipelines.console import say
from pipelines.signals import signal_name, stop_requested
from pipelines.spark import cancel_jobs_on_stop

TERMINAL = ("FINISHED", "KILLED", "FAILED")


def child_runs(client: Any, exp_id: str, parent_id: str, status: str | None = None) -> list[Any]:
    where = f"tags.mlflow.parentRunId = '{parent_id}'" + (f" and attributes.status = '{status}'" if status else "")
    return client.search_runs([exp_id], where, max_results=5000)


class ChildRunPrinter(threading.Thread):
    """Watches a parent run's children (trials run on executors) and prints `line(run)` as each one ends."""

    def __init__(self, client: Any, exp_id: str, parent_id: str, stage: str, line: Callable[[Any], str],
                 earlier: set[str] = frozenset()):
        super().__init__(daemon=True)
        self.client, self.exp_id, self.parent_id, self.stage, self.line = client, exp_id, parent_id, stage, line
        self.done = threading.Event()
        self.before = set(earlier)  # children of an earlier invocation (a resumed study's trials)
        self.printed: set[str] = set()

    def run(self) -> None:
        while not self.done.wait(2.0):
            self.poll()

    def poll(self) -> None:
        with contextlib.suppress(Exception):  # a store busy for a moment: the next poll catches up
            for run in sorted(child_runs(self.client, self.exp_id, self.parent_id), key=lambda r: r.info.start_time):
                rid = run.info.run_id
                if rid not in self.before and rid not in self.printed and run.info.status in TERMINAL:
                    self.printed.add(rid)
                    say(self.stage, self.line(run))

    def stop(self) -> None:
        self.done.set()
        self.join(timeout=10)
        self.poll()

    def new_runs(self) -> list[Any]:
        """The children this job made."""
        return [r for r in child_runs(self.client, self.exp_id, self.parent_id) if r.info.run_id not in self.before]


def kill_running_children(client: Any, exp_id: str, parent_id: str) -> None:
    """After SIGTERM/Ctrl-C: once Spark has killed the tasks' Python workers (their training processes die with
    them), mark every child still RUNNING as KILLED."""
    time.sleep(4.0)  # spark.python.task.killTimeout (2 s) after the cancelled tasks were interrupted, and a margin
    for run in child_runs(client, exp_id, parent_id, "RUNNING"):
        client.set_tag(run.info.run_id, "error", f"stopped by {signal_name(stop_requested())}")
        client.set_terminated(run.info.run_id, status="KILLED")


@contextlib.contextmanager
def watching_children(spark: Any, client: Any, exp_id: str, parent_id: str, stage: str, line: Callable[[Any], str],
                      earlier: set[str] = frozenset()) -> Iterator[ChildRunPrinter]:
    """While the block runs the children (Spark tasks), print a line as each ends; a stop signal cancels the Spark
    jobs at once, and no child is left RUNNING after it."""
    printer = ChildRunPrinter(client, exp_id, parent_id, stage, line, earlier)
    printer.start()
    cancel_jobs_on_stop(spark)
    try:
        yield printer
    except BaseException:
        if stop_requested():
            kill_running_children(client, exp_id, parent_id)
        raise
    finally:
        printer.stop()
