"""Tuning throughput: the same study (same space, sampler seed, budget) run one trial at a time and then with
tune.parallelism trials at once as Spark tasks on this machine, in one run; trials finished per hour of each.

    .venv/bin/python benchmarks/tune_parallelism.py [--trials 6] [--parallelism 2] [--epochs 2] [--rows 6000]

Pruning is off (startup_trials = trials), so both studies train the same number of epochs.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil

from common import BENCH_DIR, ROOT, bench_dataset, report


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=6)
    ap.add_argument("--parallelism", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--rows", type=int, default=6000)
    args = ap.parse_args()

    from pipelines.config import load_config
    from pipelines.console import quiet_libraries

    quiet_libraries(False)
    from pipelines.spark import get_spark
    from pipelines.tune.study import run_tune

    work = BENCH_DIR / "tune"
    shutil.rmtree(work, ignore_errors=True)
    space = {"train.optimizer": {"choice": ["adam", "rmsprop"]},
             "train.learning_rate": {"float": [3e-4, 3e-3], "log": True}, "train.dropout": {"float": [0.1, 0.4]}}
    sets = [f"paths.datasets_root={BENCH_DIR}/datasets", "ingest.name=bench_fmnist", f"paths.studies_root={work}",
            f"mlflow.tracking_uri=sqlite:///{work}/mlflow.db", f"mlflow.artifact_location={work}/mlartifacts",
            f"spark.master=local[{max(2, args.parallelism)}]", "train.model=mnist_cnn", f"tune.trials={args.trials}",
            f"tune.epochs={args.epochs}", f"tune.max_train_rows={args.rows}", f"tune.pruner.startup_trials={args.trials}",
            f"tune.space={json.dumps(space)}", "mlflow.system_metrics_seconds=0"]
    cfg = load_config([ROOT / "conf/local.yaml"], sets)
    spark = get_spark(cfg)
    bench_dataset(spark, cfg)
    seconds = {}
    for parallelism in (1, args.parallelism):
        run = load_config([ROOT / "conf/local.yaml"], [*sets, f"tune.study=p{parallelism}",
                                                         f"tune.parallelism={parallelism}"])
        out = run_tune(spark, run)
        seconds[parallelism] = out["seconds"]
    spark.stop()
    per_hour = {p: args.trials * 3600 / s for p, s in seconds.items()}
    report(f"tune: {args.trials} trials of {args.epochs} epoch(s) on {args.rows} rows, mnist_cnn, {os.cpu_count()} cores",
           [("one trial at a time", per_hour[1], "trials/hour"),
            (f"{args.parallelism} trials at once (Spark tasks)", per_hour[args.parallelism], "trials/hour")],
           f"{args.parallelism} at once vs one at a time", per_hour[args.parallelism] / per_hour[1], 1.6)


if __name__ == "__main__":
    main()
