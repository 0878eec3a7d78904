"""MLflow helpers shared by the stages: tracking store, experiment, run lifecycle, config and figures."""
from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Iterator

import yaml

from pipelines.config import Config, overlay_name, resolve_path
from pipelines.secrets import redact, redacted_dict
from pipelines.signals import Stopped, signal_name, stop_requested


# The MLflow UI opens an experiment on its GenAI overview (traces, tokens) unless the experiment says it holds model
# training runs.
EXPERIMENT_KIND, TRAINING_KIND = "mlflow.experimentKind", "custom_model_development"


def tracking_uri(cfg: Config) -> str:
    """The tracking URI with a relative sqlite path made absolute (workers may run elsewhere)."""
    uri = cfg.mlflow.tracking_uri
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        db = resolve_path(uri[len("sqlite:///"):])
        db.parent.mkdir(parents=True, exist_ok=True)
        uri = f"sqlite:///{db}"
    return uri


def configure(cfg: Config) -> str:
    """Point MLflow at the configured store and experiment; return the experiment id."""
    import mlflow

    uri = tracking_uri(cfg)
    os.environ["MLFLOW_TRACKING_URI"] = uri
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(cfg.mlflow.experiment)
    if exp is not None:
        exp_id = exp.experiment_id
        if exp.tags.get(EXPERIMENT_KIND) != TRAINING_KIND:  # made by an earlier release, or by hand
            client.set_experiment_tag(exp_id, EXPERIMENT_KIND, TRAINING_KIND)
    else:
        location = None
        if cfg.mlflow.artifact_location and not uri.startswith(("http", "databricks")):
            location = resolve_path(cfg.mlflow.artifact_location).as_uri()
        try:
            exp_id = client.create_experiment(cfg.mlflow.experiment, artifact_location=location,
                                              tags={EXPERIMENT_KIND: TRAINING_KIND})
        except Exception:  # created concurrently by another job
            exp_id = client.get_experiment_by_name(cfg.mlflow.experiment).experiment_id
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}, for MLflow params."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_params(cfg: Config, sections: tuple[str, ...]) -> dict[str, str]:
    """The given config sections as MLflow params: dotted keys, values as strings (MLflow keeps 500 characters)."""
    data = redacted_dict(cfg.to_dict())
    return {k: str(v)[:500] for k, v in flatten({s: data[s] for s in sections}).items()}


def log_config(cfg: Config, sections: tuple[str, ...]) -> None:
    """The effective config: the given sections as params, all of it as config.yaml."""
    import mlflow

    mlflow.log_params(config_params(cfg, sections))
    mlflow.log_dict(redacted_dict(cfg.to_dict()), "config.yaml")


def git_commit() -> str:
    """The checkout's commit, or 'unknown' outside git."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except Exception:
        return "unknown"


@contextlib.contextmanager
def run(cfg: Config, name: str, run_id: str | None = None, tags: dict[str, str] | None = None,
        run_name: str | None = None) -> Iterator[Any]:
    """An MLflow run of stage `name`, shown as `run_name` (what ran: `train vgg_small fashion_mnist/v0001`), that ends
    FINISHED; KILLED when the job is stopped by a signal; else FAILED with the error."""
    import mlflow

    configure(cfg)
    active = mlflow.start_run(run_id=run_id, run_name=None if run_id else (run_name or name))
    try:
        mlflow.set_tags({"git_commit": git_commit(), "sparkvision.stage": name, **(tags or {})})
        yield active
    except BaseException as exc:
        signum = exc.signum if isinstance(exc, Stopped) else stop_requested()
        if signum or isinstance(exc, KeyboardInterrupt):
            mlflow.set_tag("error", str(exc) if isinstance(exc, Stopped) else f"stopped by {signal_name(signum)}")
            mlflow.end_run(status="KILLED")
        else:
            mlflow.set_tag("error", redact(f"{type(exc).__name__}: {exc}")[:5000])
            mlflow.end_run(status="FAILED")
        raise
    else:
        mlflow.end_run(status="FINISHED")


def log_dataset(ds: Any, manifest: Any, context: str, split: str | None = None) -> None:
    """A published dataset version (or one split of it) as the active run's input: name, digest, split sizes and
    shape, so the UI links datasets, training runs, models, evaluations and predictions."""
    import warnings

    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.http_dataset_source import HTTPDatasetSource  # noqa: F401  (registers sources)
    from mlflow.data.meta_dataset import MetaDataset

    path = ds.split_path(split) if split else ds.path
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "can be interpreted in multiple ways": both are local artifact sources
        source = resolve_dataset_source(path.as_uri())
    dataset = MetaDataset(source=source, name=f"{ds.ref}:{split}" if split else ds.ref,
                          digest=manifest.digest.split(":")[-1][:36])
    counts = manifest.data["counts"]["splits"]
    tags = {f"{s}_rows": str(counts[s]) for s in ((split,) if split else ("train", "validation", "test"))}
    mlflow.log_input(dataset, context=context, tags={**tags, "shape": "x".join(map(str, manifest.shape))})


def log_figure_png(fig: Any, artifact_file: str) -> None:
    """Save a matplotlib figure as a PNG artifact and close it."""
    import matplotlib.pyplot as plt
    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(artifact_file).name
        fig.savefig(path, dpi=100, bbox_inches="tight")
        mlflow.log_artifact(str(path), str(Path(artifact_file).parent) if "/" in artifact_file else None)
    plt.close(fig)


def ui_command(cfg: Config) -> str:
    """The command that opens the MLflow UI on this store."""
    uri = tracking_uri(cfg)
    if uri.startswith("http"):
        return f"open {uri}"
    return " ".join(["sparkvision ui", *(f"--conf {overlay_name(src)}" for src in cfg.sources[1:])])  # [0]: base


def dump_yaml(data: dict[str, Any]) -> str:
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False)
