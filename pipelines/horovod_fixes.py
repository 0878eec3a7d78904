"""A fix for Horovod 0.28.1 on Spark, applied in the executors' Python daemon (pipelines.executor_daemon).

Each Spark task of `horovod.spark.run` keeps its task service up for at least 3 s after its Gloo command starts, so
that the driver has time to ask for the exit code. `SparkTaskService._run_command` starts that clock only after the
command has ended (the base class runs the command to completion first), so every task sleeps 3 s after training
is over and every run takes 3 s longer. Here the clock starts when the command does, as the docstring of
`SparkTaskService.wait_for_command_termination` says it should."""
from __future__ import annotations


def start_command_lifetime_at_launch() -> None:
    """Patch SparkTaskService._run_command so the minimum command lifetime counts from the command's start."""
    from horovod.runner.common.service.task_service import BasicTaskService
    from horovod.runner.common.util import timeout
    from horovod.spark.task.task_service import SparkTaskService

    if getattr(SparkTaskService._run_command, "sparkvision_fixed", False):
        return

    def _run_command(self, command, env, event, stdout=None, stderr=None, index=None,
                     prefix_output_with_timestamp=False):
        if self._minimum_command_lifetime_s is not None:
            self._minimum_command_lifetime = timeout.Timeout(self._minimum_command_lifetime_s,
                                                             message="Just measuring runtime")
        BasicTaskService._run_command(self, command, env, event, stdout, stderr, index,
                                      prefix_output_with_timestamp)

    _run_command.sparkvision_fixed = True
    SparkTaskService._run_command = _run_command
