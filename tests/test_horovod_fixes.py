"""The Horovod fix the executors' daemon applies: a task service's minimum command lifetime counts from the start
of its command, not from its end."""
import threading
import time

from horovod.runner.common.util import secret
from horovod.spark.task.task_service import SparkTaskService

from pipelines.horovod_fixes import start_command_lifetime_at_launch


def lifetime_end_after_a_command(seconds: float) -> tuple[float, float]:
    """Run `sleep SECONDS` through a real task service; (when it started, when its minimum lifetime ends)."""
    task = SparkTaskService(0, secret.make_secret_key(), None, minimum_command_lifetime_s=3)
    try:
        started = time.time()
        task._run_command(f"sleep {seconds}", {}, threading.Event())
        return started, task._minimum_command_lifetime._timeout_at
    finally:
        task.shutdown()


def test_the_minimum_lifetime_counts_from_the_commands_start():
    started, ends = lifetime_end_after_a_command(1.5)
    assert ends >= started + 4.5, "Horovod's own behaviour changed: is the fix still needed?"
    start_command_lifetime_at_launch()
    start_command_lifetime_at_launch()  # applying it twice changes nothing
    started, ends = lifetime_end_after_a_command(1.5)
    assert started <= ends - 3 < started + 0.5  # 3 s from the start: nothing left to wait once it has run 1.5 s
