"""Time to accuracy: wall seconds from the start of `train` (Spark, Horovod workers, the feed, every epoch) to the
first epoch whose validation accuracy reaches each target, for the default configuration and the accurate profile,
on the whole Fashion-MNIST training split.

    .venv/bin/python benchmarks/time_to_accuracy.py [--profiles default,accurate] [--targets 0.90,0.92,0.93]
        [--set train.epochs=2]

Each profile trains once (`--repeat` for more: the accurate profile alone takes minutes). A target the run never
reaches is reported with the best validation accuracy it did reach.
"""
from __future__ import annotations

import argparse
import shutil
import time

from common import BENCH_DIR, ROOT, bench_dataset, record

PROFILES = {"default": [], "accurate": ["conf/profiles/accurate.yaml"]}


def accuracy_times(tracking_uri: str, run_id: str, started_ms: float) -> list[tuple[float, float]]:
    """(seconds since `started_ms`, validation accuracy) of each epoch, in epoch order, from the run's metrics."""
    from mlflow import MlflowClient

    history = MlflowClient(tracking_uri=tracking_uri).get_metric_history(run_id, "val_accuracy")
    return [((m.timestamp - started_ms) / 1000, m.value) for m in sorted(history, key=lambda m: m.step)]


def seconds_to(curve: list[tuple[float, float]], target: float) -> float | None:
    """Seconds until the first epoch at or above `target`; None when no epoch got there."""
    return next((s for s, acc in curve if acc >= target), None)


def train_profile(spark, profile: str, base: list[str]):
    """Train with the profile's overlay; its (seconds, val_accuracy) curve, train's result and the config."""
    from pipelines.config import load_config
    from pipelines.train.job import run_train

    cfg = load_config([ROOT / "conf/local.yaml", *(ROOT / p for p in PROFILES[profile])], base)
    shutil.rmtree(BENCH_DIR / "accuracy" / "ckpt", ignore_errors=True)  # from scratch, never resumed
    started_ms = time.time() * 1000
    out = run_train(spark, cfg)
    return accuracy_times(cfg.mlflow.tracking_uri, out["run_id"], started_ms), out, cfg


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profiles", default="default,accurate", help=f"comma-separated, of {', '.join(PROFILES)}")
    ap.add_argument("--targets", default="0.90,0.92,0.93", help="validation accuracies, comma-separated")
    ap.add_argument("--repeat", type=int, default=1, help="trainings per profile")
    ap.add_argument("--set", action="append", default=[], dest="overrides", help="config override, e.g. train.epochs=2")
    args = ap.parse_args()
    profiles = args.profiles.split(",")
    unknown = [p for p in profiles if p not in PROFILES]
    if unknown:
        raise SystemExit(f"unknown profile {unknown[0]!r}; choose from {', '.join(PROFILES)}")
    targets = [float(t) for t in args.targets.split(",")]

    from pipelines.config import load_config
    from pipelines.console import quiet_libraries

    quiet_libraries(False)
    from pipelines.spark import get_spark

    shutil.rmtree(BENCH_DIR / "accuracy", ignore_errors=True)
    base = [f"paths.datasets_root={BENCH_DIR}/datasets", f"paths.checkpoints_root={BENCH_DIR}/accuracy/ckpt",
            f"mlflow.tracking_uri=sqlite:///{BENCH_DIR}/accuracy/mlflow.db",
            f"mlflow.artifact_location={BENCH_DIR}/accuracy/mlartifacts", "ingest.name=bench_fmnist",
            *args.overrides]
    spark = get_spark(load_config([ROOT / "conf/local.yaml"], base))
    bench_dataset(spark, load_config([ROOT / "conf/local.yaml"], base))
    for profile in profiles:
        runs = [train_profile(spark, profile, base) for _ in range(args.repeat)]
        out, t = runs[0][1], runs[0][2].train
        what = (f"time to accuracy, {profile} profile ({t.model}, {t.epochs} epochs, {t.num_proc} workers, "
                f"{out['precision']})")
        print(f"\n== {what}")
        for target in targets:
            reached = [s for s in (seconds_to(curve, target) for curve, _, _ in runs) if s is not None]
            best = max(acc for curve, _, _ in runs for _, acc in curve)
            line = (f"{len(reached)} of {len(runs)} run(s) reached it" if reached
                    else f"not reached (best validation accuracy {best:.4f})")
            print(f"  validation accuracy {target:.2f}: "
                  + (f"{min(reached):.0f} s" if reached else "-") + f"  ({line})")
            record(f"{what}, seconds to validation accuracy {target:.2f}", None, reached, "s", None,
                   lower_is_better=True, note=line)
    spark.stop()


if __name__ == "__main__":
    main()
