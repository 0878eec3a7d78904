"""Shared fixtures: a real local SparkSession and a config rooted in a temporary folder."""
from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pytest  # noqa: E402

import pipelines  # noqa: E402,F401  (sets the environment every process needs, before TensorFlow is imported)
from pipelines.config import Config, load_config  # noqa: E402


def make_config(tmp_path, *overrides: str) -> Config:
    """A config whose every output lives under tmp_path."""
    base = [
        f"paths.datasets_root={tmp_path}/datasets",
        f"paths.checkpoints_root={tmp_path}/checkpoints",
        f"paths.runs_root={tmp_path}/runs",
        f"paths.predictions_root={tmp_path}/predictions",
        f"paths.studies_root={tmp_path}/studies",
        f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
        f"mlflow.artifact_location={tmp_path}/mlartifacts",
        "spark.shuffle_partitions=4",
        "train.model=mnist_cnn",  # the fast model the tests' learning bars were set with
    ]
    return load_config([], [*base, *overrides])


@pytest.fixture(scope="session")
def spark(tmp_path_factory):
    """One real local[2] SparkSession for the whole test session."""
    from pipelines.spark import get_spark

    cfg = make_config(tmp_path_factory.mktemp("spark"))
    session = get_spark(cfg)
    yield session
    session.stop()


@pytest.fixture
def cfg_factory(tmp_path):
    return lambda *overrides: make_config(tmp_path, *overrides)


# `make reliability` (scripts/reliability.py) runs the tests marked `fault` with this set to a JSON-lines file: one
# row per test, with what the test observed (the `observe` fixture) and whether it passed.
FAULT_REPORT_VAR = "SPARKVISION_FAULT_REPORT"


@pytest.fixture
def observe(request):
    """`observe(key=value, ...)`: what a fault test saw, for its row in the reliability table."""
    facts: dict = {}
    request.node.observed = facts
    return facts.update


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    markers, path = list(item.iter_markers("fault")), os.environ.get(FAULT_REPORT_VAR)
    if not markers or not path or report.when != "call":
        return
    import json

    params = getattr(getattr(item, "callspec", None), "params", {})
    with open(path, "a") as fh:
        for marker in markers:  # a test may stand for more than one row
            row = {"fault": marker.args[0].format(**params), "kind": marker.kwargs.get("kind", "fault"),
                   "test": item.nodeid, "passed": report.passed, "seconds": round(report.duration, 1),
                   "shows": marker.kwargs.get("shows", ""), "observed": getattr(item, "observed", {})}
            fh.write(json.dumps(row, default=str) + "\n")
