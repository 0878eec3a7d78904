"""The one place the processes' environment is set, and the one answer to "verbose?"."""
import os
import subprocess
import sys

from pipelines import environment


def test_importing_the_package_sets_what_tensorflow_must_see_first():
    env = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    code = ("import os, sys, pipelines; assert 'tensorflow' not in sys.modules; "
            "print(os.environ['TF_USE_LEGACY_KERAS'])")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "1"


def test_verbosity_is_recorded_for_this_process_and_every_child(monkeypatch):
    monkeypatch.setenv(environment.VERBOSE_VAR, "0")
    assert not environment.is_verbose()
    environment.set_verbose(True)
    assert environment.is_verbose() and environment.child_env()[environment.VERBOSE_VAR] == "1"
    assert environment.worker_env()["TF_CPP_MIN_LOG_LEVEL"] == "0"
    environment.set_verbose(False)
    child = environment.child_env(EXTRA="x")
    assert child[environment.VERBOSE_VAR] == "0" and child["PYTHONWARNINGS"] == "ignore" and child["EXTRA"] == "x"
    assert child["TF_USE_LEGACY_KERAS"] == "1"
