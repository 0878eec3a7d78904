"""Tuning throughput: the same study (same space, sampler seed, budget) run one trial at a time and then with
tune.parallelism trials at once as Spark tasks on this machine, in one run; trials finished per hour of each.

    .venv/bin/python benchmarks/tune_parallelism.py [--trials 6] [--parallelism 2] [--epochs 2] [--rows 6000]

Pruning is off (startup_trials = trials), so both studies train the same number of epochs. Then the bound that no
scheduler can beat on this machine: one trial's own process (the study's first trial, re-run with its spec, no Spark
and no Optuna storage) alone on every core, and two of them at once, one core each.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

from common import BENCH_DIR, ROOT, bench_dataset, record, report


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
    alone, pair = bare_trial_seconds(work / "p1" / "trials" / "trial-0", f"sqlite:///{work}/mlflow.db")
    per_hour = {p: args.trials * 3600 / s for p, s in seconds.items()}
    report(f"tune: {args.trials} trials of {args.epochs} epoch(s) on {args.rows} rows, mnist_cnn, {os.cpu_count()} cores",
           [("one trial at a time", per_hour[1], "trials/hour"),
            (f"{args.parallelism} trials at once (Spark tasks)", per_hour[args.parallelism], "trials/hour")],
           f"{args.parallelism} at once vs one at a time", per_hour[args.parallelism] / per_hour[1], 1.6)
    report("the bound: one trial's own process, no Spark, no Optuna storage",
           [("one alone, every core", alone, "s"), ("two at once, one core each", pair, "s (both done)")],
           "two at once vs one after the other", 2 * alone / pair, 1.6)
    what = f"tune, {args.trials} trials of {args.epochs} epoch(s) on {args.rows:,} rows"
    record(f"{what}, {args.parallelism} at once vs one at a time", [per_hour[1]], [per_hour[args.parallelism]],
           "trials/hour", 1.6, note="one study each way: a study is the repetition")
    record(f"{what}, bound: a bare trial process, two at once vs one after the other", [3600 / alone],
           [2 * 3600 / pair], "trials/hour", 1.6, note="no Spark, no Optuna storage: what no scheduler can beat")


def bare_trial_seconds(trial_dir, tracking_uri: str) -> tuple[float, float]:
    """Seconds for a finished trial's child process re-run alone, and for two copies of it at once, each pinned to
    its own core; each copy logs to a new run of the study's experiment."""
    import subprocess
    import sys
    import tempfile
    import time

    from mlflow import MlflowClient

    from pipelines.tune.trial import SPEC_FILE

    job = json.loads((trial_dir / SPEC_FILE).read_text())
    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_run(job["spec"]["run_id"]).info.experiment_id

    def copies(n: int) -> list[str]:
        dirs = []
        for _ in range(n):
            d = tempfile.mkdtemp(prefix="bare-trial-", dir=trial_dir.parent)
            spec = {**job["spec"], "checkpoint_dir": d, "run_id": client.create_run(experiment).info.run_id}
            (Path(d) / SPEC_FILE).write_text(json.dumps({**job, "spec": spec}))
            dirs.append(d)
        return dirs

    def run(dirs: list[str], cores: list[list[int]] | None) -> float:
        t0 = time.perf_counter()
        procs = [subprocess.Popen([sys.executable, "-m", "pipelines.tune.trial_process", d],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  preexec_fn=(lambda c=c: os.sched_setaffinity(0, c)) if c else None)
                 for d, c in zip(dirs, cores or [None] * len(dirs))]
        if any(p.wait() for p in procs):
            raise SystemExit("a bare trial failed")
        return time.perf_counter() - t0

    cpus = sorted(os.sched_getaffinity(0))
    return run(copies(1), None), run(copies(2), [[cpus[0]], [cpus[1 % len(cpus)]]])


if __name__ == "__main__":
    main()
