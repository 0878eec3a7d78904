"""No Keras progress bars from the local executors' Python workers (unless --verbose).

`mlflow.pyfunc.spark_udf` scores with `keras_model.predict(data)` and no `verbose` argument, so every Arrow batch
printed a progress bar into the user's terminal. tf_keras has one switch for it, `disable_interactive_logging()`
(messages then go to absl logging, hidden by default), and no environment variable. The executors' daemon
(pipelines.executor_daemon) installs an import hook that flips the switch in each worker it forks, right after
that worker imports tf_keras's io_utils, so TensorFlow is imported only where a task needs it."""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from typing import Any

IO_UTILS = "tf_keras.src.utils.io_utils"


class _QuietAfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself; wraps the loader of IO_UTILS so that interactive logging is off once it has run."""

    def find_spec(self, name: str, path: Any, target: Any = None):
        if name != IO_UTILS:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        run_module = spec.loader.exec_module

        def exec_module(module):
            run_module(module)
            module.disable_interactive_logging()

        spec.loader.exec_module = exec_module
        return spec


def quiet_keras_progress_bars() -> None:
    """Install the hook in this process (and the processes it forks); a no-op when installed already."""
    if not any(isinstance(f, _QuietAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _QuietAfterImport())
