"""The executors' hook that turns Keras progress bars off, in a fresh interpreter as a forked Python worker would
import tf_keras: model.predict without `verbose` (as mlflow's spark_udf calls it) prints nothing."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PREDICT = """
import numpy as np
{hook}
import tf_keras as keras
model = keras.Sequential([keras.layers.Input((4,)), keras.layers.Dense(2)])
model.predict(np.zeros((300, 4)), batch_size=10)
print("predicted")
"""


@pytest.mark.parametrize("hooked", [False, True])
def test_predict_without_verbose_prints_a_progress_bar_only_without_the_hook(hooked):
    hook = "from pipelines.keras_quiet import quiet_keras_progress_bars; quiet_keras_progress_bars()" if hooked else ""
    out = subprocess.run([sys.executable, "-c", PREDICT.format(hook=hook)], capture_output=True, text=True,
                         timeout=300, env={"TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "3",
                                           "PATH": "/usr/bin:/bin"}, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("predicted")
    assert ("30/30" in out.stdout) is not hooked, out.stdout[-500:]
