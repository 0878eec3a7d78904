"""The environment every sparkvision process needs, and the one answer to "verbose?".

The package sets it on import (`pipelines/__init__.py`), so the driver, every Spark executor's Python worker and
every Horovod worker has it before TensorFlow is first imported: Horovod's Keras API needs Keras 2 (tf-keras),
which TensorFlow 2.16 picks only when TF_USE_LEGACY_KERAS is set before its own import.
"""
from __future__ import annotations

import os

VERBOSE_VAR = "SPARKVISION_VERBOSE"
# set by the workflow runner: a file, one per task of a workflow run, kept across the task's attempts, where a job
# records the MLflow run it works on, so that a retry goes on with that run (train resumes it) instead of starting over
TASK_RUN_FILE_VAR = "SPARKVISION_TASK_RUN_FILE"
REQUIRED = {"TF_USE_LEGACY_KERAS": "1"}


def set_required() -> None:
    """What every process needs, unless the process says otherwise already."""
    for key, value in REQUIRED.items():
        os.environ.setdefault(key, value)


def set_verbose(verbose: bool) -> None:
    """Record this process's choice, for itself and for every process it starts (executors, workers, tasks)."""
    os.environ[VERBOSE_VAR] = "1" if verbose else "0"


def is_verbose() -> bool:
    """Whether library output is shown: --verbose here, or in the process that started this one."""
    return os.environ.get(VERBOSE_VAR) == "1"


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a process this one starts (a spark-submit task, a Spark daemon, a Horovod worker)."""
    quiet = {} if is_verbose() else {"PYTHONWARNINGS": "ignore", "TF_CPP_MIN_LOG_LEVEL": "3"}
    return {**os.environ, **REQUIRED, VERBOSE_VAR: "1" if is_verbose() else "0", **quiet, **extra}


def worker_env() -> dict[str, str]:
    """What a Spark executor (and each Horovod worker it starts) needs set before its Python starts: the required
    variables, TensorFlow's C++ log level and this process's verbosity (spark.executorEnv.* entries)."""
    return {**REQUIRED, "TF_CPP_MIN_LOG_LEVEL": "0" if is_verbose() else "3", "PYTHONWARNINGS": "ignore",
            VERBOSE_VAR: "1" if is_verbose() else "0"}
