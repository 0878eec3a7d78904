"""`sparkvision tune`: an Optuna study kept in MLflow (`MlflowStorage`: the study is the parent run, each trial a
child run) whose trials run in parallel as Spark tasks (`MlflowSparkStudy`), each a one-worker training with the
project's own worker code. Seeded TPE, median pruning on each epoch's validation accuracy, resumable by name."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyspark.sql import SparkSession

from pipelines import tracking
from pipelines.config import Config, ConfigError, TrainConfig, dataset_ref, overlay, resolve_path
from pipelines.console import say
from pipelines.dataset.contract import DatasetVersion, resolve_dataset
from pipelines.environment import is_verbose
from pipelines.errors import PipelineError
from pipelines.signals import signal_name, stop_requested
from pipelines.train.launch import check_task_slots
from pipelines.train.spec import TrainingData, WorkerSpec, training_data
from pipelines.tune import report
from pipelines.storage import check_writable
from pipelines.tune.space import Param, parse_space, suggest
from pipelines.tune.subset import stratified_subset
from pipelines.tune.progress import TERMINAL, child_runs, watching_children
from pipelines.tune.trial import Placement, TrialStopped, train_in_child

@dataclass(frozen=True)
class TrialSetup:
    """What every trial of a study needs, pickled to the executors with the objective."""
    cfg: Config
    params: tuple[Param, ...]
    data: TrainingData
    tracking_uri: str
    trials_dir: str
    slots: int  # trials sharing one machine's cores at once (local master), else 1


def trial_config(cfg: Config, values: dict[str, Any], epochs: int, seed: int | None = None) -> TrainConfig:
    """The training config of one trial or variant: the base config with `values`, tune.epochs, one worker."""
    fixed = {"train.epochs": epochs, "train.num_proc": 1, **({"train.seed": seed} if seed is not None else {})}
    return overlay(cfg, {**values, **fixed}, "tune").train


def objective(setup: TrialSetup):
    """The function each Spark task optimizes with: train one suggested point, report every epoch to the pruner,
    return the last epoch's validation accuracy."""
    def run_trial(trial) -> float:
        import mlflow
        import optuna

        from pyspark import TaskContext

        optuna.logging.set_verbosity(optuna.logging.INFO if is_verbose() else optuna.logging.WARNING)
        client = mlflow.MlflowClient(setup.tracking_uri)
        client.set_tag(trial._trial_id, "mlflow.runName", f"trial {trial.number}")
        client.set_tag(trial._trial_id, "started_ms", str(int(time.time() * 1000)))  # an enqueued run was made earlier
        values = suggest(trial, list(setup.params))
        spec = WorkerSpec(trial_config(setup.cfg, values, setup.cfg.tune.epochs), setup.data, trial._trial_id,
                          setup.tracking_uri, str(Path(setup.trials_dir) / f"trial-{trial.number}"))

        def on_epoch(m: dict[str, float]) -> bool:
            trial.report(m["val_accuracy"], int(m["epoch"]))
            last = int(m["epoch"]) + 1 >= setup.cfg.tune.epochs  # its work is done: a result, not a prune
            return not last and trial.should_prune()

        task = TaskContext.get()
        client.set_tag(trial._trial_id, "spark_task", f"{task.stageId()}.{task.partitionId()}" if task else "driver")
        try:
            result = train_in_child(spec, on_epoch, Placement(task.partitionId() if task else 0, setup.slots))
        except TrialStopped as stop:
            client.set_tag(trial._trial_id, "pruned_at_epoch", str(int(stop.metrics["epoch"]) + 1))
            raise optuna.TrialPruned(f"{stop}: val_accuracy {stop.metrics['val_accuracy']:.4f}") from None
        except Exception as exc:
            client.set_tag(trial._trial_id, "error", str(exc)[:5000])
            raise
        return float(result["history"][-1]["val_accuracy"])

    return run_trial


def study_data(spark: SparkSession, cfg: Config, ds: DatasetVersion, study_dir: Path) -> TrainingData:
    """The dataset as trials see it: the whole validation split, the training split or its stratified subset."""
    manifest = ds.manifest()
    if not manifest.count("validation"):
        raise ConfigError(f"{ds.ref} has no validation split, which trials are scored on: re-ingest with "
                          "ingest.split.validation > 0")
    data = training_data(ds, manifest, cfg.train.class_weights)
    rows = cfg.tune.max_train_rows
    sub = study_dir / f"train_subset_{rows}"
    return stratified_subset(spark, ds, data, rows, cfg.train.seed, sub, cfg.ingest.row_group_rows)


def local_slots(spark: SparkSession, parallelism: int) -> int:
    """Trials that share one machine's cores: all of them on a local master; a cluster's executors are apart."""
    return parallelism if spark.sparkContext.master.startswith("local") else 1


def run_tune(spark: SparkSession, cfg: Config) -> dict[str, Any]:
    """Run tune.trials more trials of the study tune.study (new, or continued); write best.yaml and the plots."""
    import mlflow
    from mlflow.optuna.storage import MlflowStorage

    started = time.perf_counter()
    params, tc = parse_space(cfg), cfg.tune
    ds = resolve_dataset(cfg.paths.datasets_root, dataset_ref(cfg))
    ds.check_files(("train", "validation"))
    check_writable(resolve_path(cfg.paths.studies_root), "paths.studies_root")
    check_task_slots(spark, tc.parallelism)
    name = tc.study or f"tune-{ds.name}"
    study_dir = resolve_path(cfg.paths.studies_root) / name
    exp_id = tracking.configure(cfg)
    data = study_data(spark, cfg, ds, study_dir)
    study = new_or_resumed_study(name, MlflowStorage(experiment_id=exp_id), tc)
    client, study_id = mlflow.MlflowClient(), study._study_id
    record_study_start(client, cfg, study, ds, data, params)
    setup = TrialSetup(cfg, tuple(params), data, tracking.tracking_uri(cfg), str(study_dir / "trials"),
                       local_slots(spark, tc.parallelism))
    say("tune", f"{'continuing' if study.is_resumed_study else 'starting'} study {name} (run {study_id}): "
                f"{tc.trials} trial(s), {tc.parallelism} at a time, {tc.epochs} epoch(s) each on {data.train_rows} "
                f"training rows of {ds.ref}; searching {', '.join(p.key for p in params)}")
    # trials of earlier invocations; enqueued ones still waiting (SCHEDULED) run in this one
    earlier = {r.info.run_id for r in child_runs(client, exp_id, study_id) if r.info.status != "SCHEDULED"}
    try:
        with watching_children(spark, client, exp_id, study_id, "tune", trial_line, earlier) as printer:
            study.optimize(objective(setup), n_trials=tc.trials, n_jobs=tc.parallelism,
                           timeout=tc.timeout_s or None, catch=(Exception,))
    except BaseException as exc:
        client.set_tag(study_id, "error", f"stopped by {signal_name(stop_requested())}" if stop_requested()
                       else f"{type(exc).__name__}: {exc}"[:5000])
        client.set_terminated(study_id, status="KILLED" if stop_requested() else "FAILED")
        raise
    return finish_study(client, cfg, name, study_id, exp_id, printer.new_runs(), study_dir, started)


def new_or_resumed_study(name: str, storage: Any, tc: Any):
    """The study `name` in the MLflow experiment: continued when it exists, else created with tune.enqueue first."""
    import optuna
    from mlflow.pyspark.optuna.study import MlflowSparkStudy

    optuna.logging.set_verbosity(optuna.logging.INFO if is_verbose() else optuna.logging.WARNING)
    sampler = optuna.samplers.TPESampler(seed=tc.sampler_seed)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=tc.pruner.startup_trials,
                                         n_warmup_steps=tc.pruner.warmup_epochs)
    study = MlflowSparkStudy(name, storage, sampler=sampler, pruner=pruner,
                             direction=None if storage.get_study_id_by_name_if_exists(name) else "maximize")
    if not study.is_resumed_study:
        # MlflowStorage hands out waiting trials newest first: enqueue the last first, so they run in the order given
        for values in reversed(tc.enqueue):
            study._study.enqueue_trial(values)
        # MlflowStorage queues a new trial's parent-run tag in a batch of this process; a Spark task searching for
        # waiting trials before it is flushed does not see them, samples a new trial instead and never runs the
        # enqueued one (seen in 2 of 3 long test runs)
        storage.flush_all_batches()
    return study


def record_study_start(client: Any, cfg: Config, study: Any, ds: DatasetVersion, data: TrainingData,
                       params: list[Param]) -> None:
    """The parent run: RUNNING again, what the study searches and on what (params only when it is new: MLflow keeps
    a run's params fixed)."""
    import mlflow

    run_id = study._study_id
    client.update_run(run_id, status="RUNNING")
    tags = {"sparkvision.stage": "tune", "git_commit": tracking.git_commit(), "dataset": ds.ref,
            "searched": ", ".join(p.key for p in params)}
    for key, value in tags.items():
        client.set_tag(run_id, key, value)
    if not study.is_resumed_study:
        logged = {**tracking.config_params(cfg, ("tune", "train")), "dataset": ds.ref,
                  "trial_train_rows": data.train_rows}
        client.log_batch(run_id, params=[mlflow.entities.Param(k, str(v)[:500]) for k, v in logged.items()])


def trial_line(run: Any) -> str:
    """How one finished trial reads on stderr."""
    number = run.data.tags.get("numbers", "?")
    values = ", ".join(f"{k.split('.', 1)[-1]}={v}" for k, v in sorted(run.data.params.items()) if k.startswith("train."))
    began = int(run.data.tags.get("started_ms", run.info.start_time))
    took = (run.info.end_time - began) / 1000 if run.info.end_time else 0
    status = run.info.status
    if status == "FINISHED":
        outcome = f"val_accuracy {run.data.metrics.get('value', float('nan')):.4f}"
    elif status == "KILLED" and "pruned_at_epoch" in run.data.tags:
        outcome = f"PRUNED after epoch {run.data.tags['pruned_at_epoch']} " \
                  f"(val_accuracy {run.data.metrics.get('val_accuracy', float('nan')):.4f})"
    elif status == "KILLED":
        outcome = "KILLED"
    else:
        outcome = f"FAILED: {run.data.tags.get('error', 'see the run')}"[:300]
    return f"trial {number}: {outcome} in {took:.0f}s ({values})"


def finish_study(client: Any, cfg: Config, name: str, study_id: str, exp_id: str, new_runs: list[Any],
                 study_dir: Path, started: float) -> dict[str, Any]:
    """Fail when every trial of this invocation failed; else best.yaml, the plots, the best trial on the parent."""
    import optuna
    from mlflow.optuna.storage import MlflowStorage

    states = {s: sum(r.info.status == s for r in new_runs) for s in TERMINAL}
    if new_runs and states["FAILED"] == len(new_runs):
        first = min(new_runs, key=lambda r: r.info.start_time)
        client.set_tag(study_id, "error", "every trial failed")
        client.set_terminated(study_id, status="FAILED")
        raise PipelineError(f"every trial of study {name} failed; the first: {first.data.tags.get('error', '?')}")
    study = optuna.load_study(study_name=name, storage=MlflowStorage(experiment_id=exp_id))
    if not any(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials):
        client.set_terminated(study_id, status="FAILED")
        raise PipelineError(f"study {name} has no completed trial yet (all pruned or failed): run more trials")
    outputs = report.study_outputs(study, cfg, study_dir)
    report.log_study_outputs(client, study_id, study, outputs)
    best = study.best_trial
    took = time.perf_counter() - started
    say("tune", f"study {name}: best trial {best.number}, val_accuracy {best.value:.4f} "
                f"({', '.join(f'{k}={v}' for k, v in best.params.items())}); {len(study.trials)} trial(s) in all; "
                f"best.yaml at {outputs['best_yaml']} ({took:.0f}s)")
    return {"stage": "tune", "study": name, "parent_run_id": study_id, "best_trial": best.number,
            "best_run_id": best._trial_id, "best_value": best.value, "best_params": best.params,
            "best_yaml": str(outputs["best_yaml"]), "trials": {"finished": states["FINISHED"],
            "pruned": states["KILLED"], "failed": states["FAILED"]}, "seconds": round(took, 1)}
