"""Helpers shared by the benchmark scripts: quiet environment, timing, printing side by side."""
from __future__ import annotations

import json
import os
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import pipelines  # noqa: E402,F401  (sets the environment every process needs, before TensorFlow is imported)
BENCH_DIR = ROOT / "var" / "bench"
ROWS_VAR = "SPARKVISION_BENCH_ROWS"  # where record() appends its rows; scripts/benchmarks.py sets it per run


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


def spread(values: Sequence[float]) -> dict[str, float]:
    """min / median / max of a benchmark's repetitions."""
    return {"min": min(values), "median": statistics.median(values), "max": max(values), "n": len(values)}


def repeat(n: int, measure: Callable[[], float]) -> list[float]:
    """`measure()` n times (each returns one figure): the repetitions a report row needs."""
    return [measure() for _ in range(n)]


def record(name: str, baseline: Sequence[float] | None, pipeline: Sequence[float], unit: str,
           goal: float | None, *, ratio_of: str = "pipeline / baseline", lower_is_better: bool = False,
           note: str = "", curve: dict | None = None, within: float | None = None) -> dict:
    """One row of the benchmark report, written as a JSON line to $SPARKVISION_BENCH_ROWS (when set): the baseline
    and pipeline repetitions measured in this run, their medians' ratio (inverted when lower is better, so a ratio
    above 1 always favours the pipeline) and whether it meets the goal. `curve`: a scaling curve to plot,
    {"x": [...], "y": [...], "x_label": ..., "y_label": ...}. `within`: a two-sided goal, met when the ratio lies
    between 1/within and within (a cost that neither grows nor falls by more than that), instead of ratio >= goal."""
    pipe = spread(pipeline) if len(pipeline) else None  # none: the pipeline never got there (say so in `note`)
    base = spread(baseline) if baseline else None
    ratio = None
    if base and pipe and base["median"] and pipe["median"]:
        ratio = base["median"] / pipe["median"] if lower_is_better else pipe["median"] / base["median"]
    met = None if goal is None or ratio is None else ratio >= goal
    if within is not None and ratio is not None:
        goal, met = 1 / within, 1 / within <= ratio <= within
    row = {"name": name, "unit": unit, "baseline": base, "pipeline": pipe, "ratio": ratio, "ratio_of": ratio_of,
           "goal": goal, "met": met, "note": note,
           "script": Path(sys.argv[0]).name, "curve": curve}
    if os.environ.get(ROWS_VAR):
        with open(os.environ[ROWS_VAR], "a") as f:
            f.write(json.dumps(row) + "\n")
    return row


def peak_rss_mb(pid: int) -> float:
    """The peak resident memory of a process so far (VmHWM), in MiB; 0 for one that has exited (or is a zombie)."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return 0.0
    return next((int(line.split()[1]) / 1024 for line in lines if line.startswith("VmHWM:")), 0.0)


def reset_peak_rss(pid: int) -> None:
    """Start a process's peak resident memory again from its current size (Linux: clear_refs 5)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        pass  # it has exited


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
