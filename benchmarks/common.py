"""Helpers shared by the benchmark scripts: quiet environment, timing, printing side by side."""
from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import pipelines  # noqa: E402,F401  (sets the environment every process needs, before TensorFlow is imported)
BENCH_DIR = ROOT / "var" / "bench"


@contextmanager
def timed(box: dict, key: str):
    t0 = time.perf_counter()
    yield
    box[key] = time.perf_counter() - t0


def report(title: str, rows: list[tuple[str, float, str]], ratio_name: str, ratio: float, goal: float) -> None:
    width = max(48, *(len(r[0]) for r in rows), len(ratio_name))
    print(f"\n== {title}")
    for name, value, unit in rows:
        print(f"  {name:<{width}} {value:>10.1f} {unit}")
    verdict = "meets" if ratio >= goal else "MISSES"
    print(f"  {ratio_name:<{width}} {ratio:>10.2f}x  ({verdict} the goal of {goal}x)")


def bench_dataset(spark, cfg):
    """The benchmarks' Fashion-MNIST dataset (ingest.name in cfg), ingested on first use."""
    from pipelines.dataset.contract import resolve_dataset
    from pipelines.errors import PipelineError
    from pipelines.ingest.job import run_ingest

    try:
        return resolve_dataset(cfg.paths.datasets_root, cfg.ingest.name)
    except PipelineError:
        run_ingest(spark, cfg)
        return resolve_dataset(cfg.paths.datasets_root, cfg.ingest.name)


def bench_model(cfg, manifest) -> str:
    """An untrained mnist_cnn for the dataset, logged and registered by `train`'s own log_model (the cost of
    inference does not depend on the weights); its models:/ URI."""
    import tempfile

    from pipelines import tracking
    from pipelines.models import build_model
    from pipelines.train.mlflow_logging import log_model

    model = build_model("mnist_cnn", manifest.shape, manifest.num_classes, manifest.mean, manifest.std)
    with tempfile.TemporaryDirectory() as tmp, tracking.run(cfg, "bench"):
        model.save(f"{tmp}/model.keras")
        _, version = log_model(cfg, f"{tmp}/model.keras", manifest)
    return f"models:/{cfg.mlflow.registered_model}/{version}"
