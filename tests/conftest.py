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
