"""`sparkvision experiment NAME`: one of the training FAQ's questions as variants (`conf/experiments/NAME.yaml`)
trained at one budget (tune.epochs, tune.max_train_rows, the same data) once per seed in tune.seeds, in parallel as
Spark tasks like a study's trials, as child runs of one parent run that holds the comparison plots and table."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pyspark.sql import SparkSession

from pipelines import tracking
from pipelines.config import CONF_DIR, Config, ConfigError, dataset_ref, overlay, resolve_path
from pipelines.console import say
from pipelines.dataset.contract import resolve_dataset
from pipelines.errors import PipelineError
from pipelines.train.launch import check_task_slots
from pipelines.train.spec import TrainingData, WorkerSpec
from pipelines.tune import report
from pipelines.tune.progress import watching_children
from pipelines.tune.study import local_slots, study_data, trial_config
from pipelines.tune.trial import Placement, train_in_child

EXPERIMENTS_DIR = CONF_DIR / "experiments"


@dataclass(frozen=True)
class Experiment:
    """A parsed conf/experiments/NAME.yaml."""
    name: str
    question: str
    settings: dict[str, Any]  # for every variant (any config key; the command line's --set wins)
    variants: dict[str, dict[str, Any]]  # label -> train.* / ingest.* values
    reach: float  # the validation accuracy whose time-to-reach the table shows
    per_class_recall: bool
    path: Path


@dataclass(frozen=True)
class Unit:
    """One variant trained with one seed: a child run."""
    variant: str
    seed: int
    run_id: str
    train: Any  # TrainConfig
    data: TrainingData
    data_ref: str
    score_urls: dict[str, str]


def list_experiments() -> list[tuple[str, str]]:
    return [(p.stem, str(yaml.safe_load(p.read_text()).get("question", ""))) for p in sorted(EXPERIMENTS_DIR.glob("*.yaml"))]


def experiment_options(name: str | None, listing: bool, overrides: list[str]) -> dict[str, Any] | None:
    """The CLI's options for run_experiment; None after printing the list for --list."""
    if listing:
        for stem, question in list_experiments():
            print(f"{stem:15s} {question}")
        return None
    if not name:
        raise ConfigError("name an experiment (sparkvision experiment --list shows them)")
    return {"name": name, "user_keys": tuple(o.split("=", 1)[0].strip() for o in overrides)}


def load_experiment(name: str) -> Experiment:
    """NAME (conf/experiments/NAME.yaml) or a path to such a file; a malformed one is a ConfigError."""
    path = Path(name) if name.endswith((".yaml", ".yml")) else EXPERIMENTS_DIR / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(stem for stem, _ in list_experiments())
        raise ConfigError(f"no experiment {name!r} (known: {known})")
    data = yaml.safe_load(path.read_text()) or {}
    unknown = set(data) - {"question", "set", "variants", "reach", "per_class_recall"}
    if unknown:
        raise ConfigError(f"{path}: unknown key '{sorted(unknown)[0]}'")
    variants = data.get("variants") or {}
    if not isinstance(variants, dict) or not all(isinstance(v, dict) for v in variants.values()) or not variants:
        raise ConfigError(f"{path}: 'variants' must map each label to its train.*/ingest.* values")
    for label, values in variants.items():
        bad = [k for k in values if not k.startswith(("train.", "ingest."))]
        if bad:
            raise ConfigError(f"{path}: variant {label}: '{bad[0]}' is not a train.* or ingest.* key")
    return Experiment(path.stem, str(data.get("question", "")), dict(data.get("set") or {}),
                      {str(k): dict(v) for k, v in variants.items()}, float(data.get("reach", 0.8)),
                      bool(data.get("per_class_recall", False)), path)


def run_experiment(spark: SparkSession, cfg: Config, name: str, user_keys: tuple[str, ...] = ()) -> dict[str, Any]:
    """Train every variant of experiment `name` once per seed; log and write the comparison plots and table."""
    import mlflow

    started = time.perf_counter()
    exp = load_experiment(name)
    base = cfg
    cfg = overlay(cfg, {k: v for k, v in exp.settings.items() if k not in user_keys}, str(exp.path))
    for label, values in exp.variants.items():
        overlay(cfg, values, f"{exp.path} variant {label}")  # every variant is valid before anything runs
    if len(set(cfg.tune.seeds)) < 2:
        raise ConfigError(f"tune.seeds: an experiment trains every variant with at least 2 seeds, so its table shows "
                          f"the noise; got {cfg.tune.seeds}")
    check_task_slots(spark, cfg.tune.parallelism)
    home = resolve_path(cfg.paths.studies_root) / f"experiment-{exp.name}"
    with tracking.run(cfg, "experiment", run_name=f"experiment {exp.name}",
                      tags={"experiment": exp.name, "question": exp.question}) as parent:
        client, exp_id, parent_id = mlflow.MlflowClient(), parent.info.experiment_id, parent.info.run_id
        mlflow.log_params({**tracking.config_params(cfg, ("tune",)), "variants": ", ".join(exp.variants)})
        mlflow.log_artifact(str(exp.path))
        units = make_units(spark, client, base, cfg, exp, home / "data", exp_id, parent_id)
        say("experiment", f"{exp.name}: {len(exp.variants)} variant(s) x {len(cfg.tune.seeds)} seed(s), "
                          f"{cfg.tune.epochs} epoch(s) each on {units[0].data.train_rows} training rows, "
                          f"{cfg.tune.parallelism} at a time (parent run {parent_id})")
        with watching_children(spark, client, exp_id, parent_id, "experiment", unit_line):
            results = run_units(spark, units, cfg.tune.parallelism, local_slots(spark, cfg.tune.parallelism),
                                tracking.tracking_uri(cfg), str(home / "runs"))
        failed = [u for u in units if "error" in results[u.run_id]]
        if len(failed) == len(units):
            raise PipelineError(f"every run of experiment {exp.name} failed; the first: "
                                f"{results[failed[0].run_id]['error']}")
        labels = resolve_dataset(cfg.paths.datasets_root, units[0].data_ref).manifest().label_names
        outputs = report.experiment_outputs(exp, units, results, labels, home / "results")
        for path in outputs.values():
            mlflow.log_artifact(str(path))
    took = time.perf_counter() - started
    say("experiment", f"{exp.name}: {len(units) - len(failed)} of {len(units)} run(s) finished; table at "
                      f"{outputs['table_md']} ({took:.0f}s)")
    return {"stage": "experiment", "experiment": exp.name, "parent_run_id": parent_id,
            "runs": {"finished": len(units) - len(failed), "failed": len(failed)},
            **{k: str(v) for k, v in outputs.items()}, "seconds": round(took, 1)}


def variant_dataset(spark: SparkSession, base: Config, cfg: Config):
    """The dataset a variant trains on: the configured one, or, when the variant changes ingest.* (a skewed split,
    oversampling), that dataset ingested under a name of its own (published once, `unchanged` on a rerun)."""
    import hashlib

    if cfg.ingest == base.ingest:
        return resolve_dataset(cfg.paths.datasets_root, dataset_ref(base))
    from pipelines.ingest.job import run_ingest

    digest = hashlib.sha256(json.dumps(cfg.to_dict()["ingest"], sort_keys=True).encode()).hexdigest()[:8]
    variant_cfg = overlay(cfg, {"ingest.name": f"{base.ingest.name}_{digest}"}, "experiment")
    out = run_ingest(spark, variant_cfg)
    return resolve_dataset(cfg.paths.datasets_root, out["dataset"])


def make_units(spark: SparkSession, client: Any, base: Config, cfg: Config, exp: Experiment, data_home: Path,
               exp_id: str, parent_id: str) -> list[Unit]:
    """One child run per variant and seed, each with its data (subset when tune.max_train_rows) and config."""
    import mlflow

    units, datasets, ingested = [], {}, {}
    for label, values in exp.variants.items():
        vcfg = overlay(cfg, values, f"{exp.path} variant {label}")
        recipe = json.dumps(vcfg.to_dict()["ingest"], sort_keys=True)
        if recipe not in ingested:  # variants that share an ingest config share one ingest, not one each
            ingested[recipe] = variant_dataset(spark, base, vcfg)
        ds = ingested[recipe]
        if ds.ref not in datasets:
            datasets[ds.ref] = study_data(spark, vcfg, ds, data_home)
        scores = {"train": datasets[ds.ref].train_url, "test": ds.split_path("test").as_uri()}
        for seed in cfg.tune.seeds:
            train = trial_config(vcfg, {}, cfg.tune.epochs, seed)
            run = client.create_run(exp_id, run_name=f"{label} seed {seed}",
                                    tags={"mlflow.parentRunId": parent_id, "variant": label, "seed": str(seed),
                                          "sparkvision.stage": "experiment", "dataset": ds.ref})
            params = {**{k: str(v) for k, v in values.items()}, "dataset": ds.ref,
                      **tracking.config_params(overlay(vcfg, {"train.seed": seed}, "experiment"), ("train",))}
            client.log_batch(run.info.run_id, params=[mlflow.entities.Param(k, v) for k, v in params.items()])
            units.append(Unit(label, seed, run.info.run_id, train, datasets[ds.ref], ds.ref, scores))
    return units


def run_units(spark: SparkSession, units: list[Unit], parallelism: int, slots: int, tracking_uri: str,
              runs_dir: str) -> dict[str, dict[str, Any]]:
    """Every unit trained in a Spark task (parallelism at once); each ends its own run. Results by run id: the
    epochs' metrics and scores (metadata only), or the error."""
    spark.sparkContext.setJobDescription("sparkvision experiment")
    task = train_units(units, tracking_uri, slots, runs_dir)
    rows = (spark.range(len(units), numPartitions=min(parallelism, len(units)))
            .mapInPandas(task, "run_id string, result string").collect())
    return {r["run_id"]: json.loads(r["result"]) for r in rows}


def train_units(units: list[Unit], tracking_uri: str, slots: int, runs_dir: str):
    """The executor side: train this partition's units one after another, each ending its own run."""
    def run_partition(batches):
        import mlflow
        import pandas as pd
        from pyspark import TaskContext

        client = mlflow.MlflowClient(tracking_uri)
        placement = Placement(TaskContext.get().partitionId(), slots)
        for batch in batches:
            for index in batch["id"]:
                unit = units[int(index)]
                spec = WorkerSpec(unit.train, unit.data, unit.run_id, tracking_uri, f"{runs_dir}/{unit.run_id}")
                result = train_unit(client, unit, spec, placement)
                yield pd.DataFrame({"run_id": [unit.run_id], "result": [json.dumps(result)]})

    return run_partition


def train_unit(client: Any, unit: Unit, spec: WorkerSpec, placement: Placement) -> dict[str, Any]:
    """One variant and seed: train, log the final scores, end the run; the history and scores, or the error."""
    from mlflow.entities import Metric

    client.set_tag(unit.run_id, "started_ms", str(int(time.time() * 1000)))  # the run was made before it queued
    try:
        result = train_in_child(spec, lambda _metrics: False, placement, unit.score_urls)
    except Exception as exc:
        client.set_tag(unit.run_id, "error", str(exc)[:5000])
        client.set_terminated(unit.run_id, status="FAILED")
        return {"error": str(exc)}
    now = int(time.time() * 1000)
    final = {"train_eval_accuracy": result["scores"]["train"]["accuracy"],
             "test_accuracy": result["scores"]["test"]["accuracy"], "epochs_run": result["epochs_run"]}
    client.log_batch(unit.run_id, metrics=[Metric(k, float(v), now, 0) for k, v in final.items()])
    client.set_terminated(unit.run_id, status="FINISHED")
    return {"history": result["history"], "scores": result["scores"]}


def unit_line(run: Any) -> str:
    """How one finished variant run reads on stderr."""
    began = int(run.data.tags.get("started_ms", run.info.start_time))
    took = (run.info.end_time - began) / 1000 if run.info.end_time else 0
    m = run.data.metrics
    if run.info.status != "FINISHED":
        return f"{run.info.run_name}: {run.info.status} {run.data.tags.get('error', '')}"[:300]
    return (f"{run.info.run_name}: val_accuracy {m.get('val_accuracy', float('nan')):.4f}, test accuracy "
            f"{m.get('test_accuracy', float('nan')):.4f} after {int(m.get('epochs_run', 0))} epoch(s) in {took:.0f}s")
