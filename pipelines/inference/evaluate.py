"""`sparkvision evaluate`: score a model on a dataset split on the executors, log the metrics, and run the
promotion gate (the Databricks "model validation" step): champion or challenger."""
from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from pipelines.dataset.encoding import with_pixels
from pipelines import tracking
from pipelines.config import Config, dataset_ref
from pipelines.console import say
from pipelines.dataset.contract import resolve_dataset
from pipelines.errors import PipelineError
from pipelines.inference import metrics as M
from pipelines.inference.models import CHALLENGER, CHAMPION, alias_version, latest_version_uri, resolve_model
from pipelines.inference.predict import predict


def score_split(df: DataFrame, model_uri: str, top_k: int, batch_size: int) -> DataFrame:
    """Predictions for a dataset split; only labels and predictions are kept (cached) for the metrics."""
    return predict(df, model_uri, top_k=top_k, batch_size=batch_size, keep_image=True)


def confusion(scored: DataFrame, num_classes: int) -> tuple[Any, float]:
    """Confusion matrix and top-k accuracy, aggregated on the executors."""
    pairs = [(r["label"], r["pred_label"], r["count"]) for r in scored.groupBy("label", "pred_label").count().collect()]
    in_top = scored.select(F.exists("top_k", lambda t: t["label"] == F.col("label")).cast("int").alias("hit"))
    top_k_acc = in_top.agg(F.avg("hit")).first()[0]
    return M.confusion_matrix(pairs, num_classes), float(top_k_acc)


def misclassified_sample(scored: DataFrame, count: int) -> DataFrame:
    """`count` misclassified rows spread over the whole split: ordered by a hash of their id, so the sample is the
    same on every run and not just the lowest ids (a top-k per partition, no full sort)."""
    return scored.where(F.col("label") != F.col("pred_label")).orderBy(F.xxhash64("id"), "id").limit(count)


def misclassified_png(scored: DataFrame, names: list[str], shape, count: int) -> bytes | None:
    """Render a grid of sampled misclassified examples on one executor; only the PNG comes back."""
    wrong = misclassified_sample(scored, count)
    rows = wrong.select("image", "label", "pred_label").coalesce(1).rdd.mapPartitions(
        lambda it: [M.misclassified_grid_png([(r["image"], names[r["label"]], names[r["pred_label"]]) for r in it], shape)])
    pngs = [p for p in rows.collect() if p]
    return pngs[0] if pngs else None


EVALUATED_ON = "test_accuracy_on"  # model version tag: the dataset version and split test_accuracy was measured on


def recorded_accuracy(name: str, version: str, split_ref: str) -> float | None:
    """The accuracy an earlier evaluation recorded on a registered version, if it scored the same dataset version
    and split (a version's weights never change, so neither does its score there); None otherwise."""
    import mlflow

    tags = mlflow.MlflowClient().get_model_version(name, version).tags
    if tags.get(EVALUATED_ON) != split_ref or "test_accuracy" not in tags:
        return None
    return float(tags["test_accuracy"])


def evaluate_model(cfg: Config, model_uri: str, split_df: DataFrame, names: list[str],
                   shape: tuple[int, int, int]) -> dict:
    scored = score_split(split_df, model_uri, cfg.evaluate.top_k, cfg.infer.batch_size).persist()
    try:
        cm, top_k = confusion(scored, len(names))
        png = misclassified_png(scored, names, shape, cfg.evaluate.misclassified_examples)
    finally:
        scored.unpersist()
    return {"cm": cm, "top_k_accuracy": top_k, "summary": M.summary(cm), "grid": png}


def _gate(cfg: Config, candidate, accuracy: float, champion_accuracy: float | None, champion_version: str | None) -> dict:
    """Champion when accuracy >= threshold and beats the current champion (or there is none)."""
    threshold = cfg.evaluate.threshold
    if candidate.version is None:
        return {"decision": "not_registered", "reason": "the model is not a registered version; no alias set"}
    if champion_version == candidate.version:
        return {"decision": CHAMPION, "reason": f"version {candidate.version} already holds the champion alias"}
    if accuracy < threshold:
        return {"decision": CHALLENGER, "reason": f"accuracy {accuracy:.4f} is below the threshold {threshold:.4f}"}
    if champion_accuracy is not None and accuracy <= champion_accuracy:
        return {"decision": CHALLENGER, "reason": f"accuracy {accuracy:.4f} does not beat champion version "
                                                    f"{champion_version} ({champion_accuracy:.4f}) on the same split"}
    why = (f"accuracy {accuracy:.4f} >= threshold {threshold:.4f}"
           + (f" and beats champion version {champion_version} ({champion_accuracy:.4f})" if champion_version else
              "; there was no champion"))
    return {"decision": CHAMPION, "reason": why}


def _log_evaluation(cfg: Config, candidate, uri: str, ds, split: str, result: dict, names: list[str],
                    gate: dict, champion_version: str | None, champion_accuracy: float | None) -> str:
    """The evaluation run (a child of the training run): the split it scored, metrics per class, report, figures,
    the gate's decision."""
    import mlflow

    acc = result["summary"]["accuracy"]
    dataset = ds.ref
    tags = {"training_run_id": candidate.run_id or "", "model_uri": uri, "dataset": dataset}
    if candidate.run_id:
        tags["mlflow.parentRunId"] = candidate.run_id  # shows the evaluation under its training run
    what = f"v{candidate.version}" if candidate.version else uri
    with tracking.run(cfg, "evaluate", tags=tags, run_name=f"evaluate {what} on {dataset}:{split}") as active:
        tracking.log_dataset(ds, ds.manifest(), "evaluation", split)
        pc = M.per_class(result["cm"])
        safe = [''.join(ch if ch.isalnum() else "_" for ch in nm) for nm in names]
        mlflow.log_metrics({"test_accuracy": acc, f"test_top_{cfg.evaluate.top_k}_accuracy": result["top_k_accuracy"],
                            "test_macro_f1": result["summary"]["macro_f1"],
                            "test_weighted_f1": result["summary"]["weighted_f1"],
                            **{f"precision_{s}": float(pc["precision"][i]) for i, s in enumerate(safe)},
                            **{f"recall_{s}": float(pc["recall"][i]) for i, s in enumerate(safe)},
                            **{f"f1_{s}": float(pc["f1"][i]) for i, s in enumerate(safe)}})
        mlflow.log_params({"model_uri": uri, "model_version": candidate.version or "", "split": split,
                           "threshold": cfg.evaluate.threshold, "dataset": dataset})
        mlflow.log_text(M.report(result["cm"], names), "classification_report.txt")
        mlflow.log_dict({"labels": names, "matrix": result["cm"].tolist()}, "confusion_matrix.json")
        tracking.log_figure_png(M.confusion_figure(result["cm"], names), "confusion_matrix.png")
        if result["grid"]:
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "misclassified.png"
                path.write_bytes(result["grid"])
                mlflow.log_artifact(str(path))
        mlflow.log_dict({**gate, "accuracy": acc, "threshold": cfg.evaluate.threshold,
                         "champion_version_before": champion_version, "champion_accuracy": champion_accuracy},
                        "promotion.json")
        mlflow.set_tags({"promotion_decision": gate["decision"]})
        eval_run_id = active.info.run_id
    return eval_run_id


def run_evaluate(spark: SparkSession, cfg: Config) -> dict[str, Any]:
    """Evaluate the configured model on the dataset's test split; log metrics and figures; promote or not."""
    import mlflow

    started = time.perf_counter()
    tracking.configure(cfg)
    name = cfg.mlflow.registered_model
    uri = cfg.evaluate.model_uri or latest_version_uri(name)
    candidate = resolve_model(uri)
    ds = resolve_dataset(cfg.paths.datasets_root, dataset_ref(cfg))
    ds.check_files((cfg.evaluate.split,))
    manifest = ds.manifest()
    if tuple(manifest.shape) != tuple(candidate.shape):
        raise PipelineError(f"model {uri} expects images {candidate.shape}, dataset {ds.ref} has {manifest.shape}")
    split = cfg.evaluate.split
    df = with_pixels(spark.read.parquet(ds.split_path(split).as_uri()), manifest)
    n = manifest.count(split)  # a published version's images were checked against its shape when it was ingested
    names = manifest.label_names

    result = evaluate_model(cfg, uri, df, names, candidate.shape)
    acc = result["summary"]["accuracy"]
    say("evaluate", f"{uri} on {ds.ref}:{split} ({n} images): accuracy {acc:.4f}, "
                    f"top-{cfg.evaluate.top_k} {result['top_k_accuracy']:.4f}, macro F1 {result['summary']['macro_f1']:.4f}")

    champion_version = alias_version(name, CHAMPION) if candidate.name == name else None
    champion_accuracy = None
    if champion_version and champion_version != candidate.version:
        champion_accuracy = recorded_accuracy(name, champion_version, f"{ds.ref}:{split}")
        if champion_accuracy is None:  # never evaluated on this split: score it now
            champ = evaluate_model(cfg, f"models:/{name}/{champion_version}", df, names, candidate.shape)
            champion_accuracy = champ["summary"]["accuracy"]
    gate = _gate(cfg, candidate, acc, champion_accuracy, champion_version)

    eval_run_id = _log_evaluation(cfg, candidate, uri, ds, split, result, names, gate, champion_version,
                                  champion_accuracy)
    client = mlflow.MlflowClient()
    if candidate.run_id:
        client.log_metric(candidate.run_id, "test_accuracy", acc)  # visible next to the training metrics
    if candidate.version and candidate.name == name:
        client.set_model_version_tag(name, candidate.version, "test_accuracy", f"{acc:.6f}")
        client.set_model_version_tag(name, candidate.version, EVALUATED_ON, f"{ds.ref}:{split}")
        client.set_registered_model_alias(name, gate["decision"], candidate.version)
    took = time.perf_counter() - started
    say("evaluate", f"promotion: version {candidate.version} -> {gate['decision']} ({gate['reason']}) in {took:.0f}s")
    return {"stage": "evaluate", "model_uri": uri, "model_version": candidate.version, "dataset": ds.ref,
            "split": split, "rows": n, "metrics": {"accuracy": acc, "top_k_accuracy": result["top_k_accuracy"],
                                                   **result["summary"]},
            "decision": gate["decision"], "reason": gate["reason"], "champion_version_before": champion_version,
            "has_champion": gate["decision"] == CHAMPION or champion_version is not None,
            "champion_accuracy": champion_accuracy, "run_id": eval_run_id, "seconds": round(took, 1)}
