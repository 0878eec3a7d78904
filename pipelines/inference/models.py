"""Finding models in MLflow: URIs, registered versions, aliases and the metadata saved with the model."""
from __future__ import annotations

import re
from dataclasses import dataclass

from pipelines.errors import PipelineError, first_line

CHAMPION = "champion"
CHALLENGER = "challenger"


@dataclass(frozen=True)
class ResolvedModel:
    uri: str                    # what the user asked for
    load_uri: str               # what executors load (models:/NAME/VERSION when registered)
    name: str | None            # registered model name
    version: str | None         # registered version
    run_id: str | None          # training run
    shape: tuple[int, int, int]
    label_names: list[str]


def resolve_model(uri: str) -> ResolvedModel:
    """runs:/RUN/model, models:/NAME/VERSION or models:/NAME@ALIAS -> version, run and metadata, or a clear error."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient()
    name = version = run_id = None
    try:
        if m := re.fullmatch(r"models:/([^/@]+)@(.+)", uri):
            mv = client.get_model_version_by_alias(m.group(1), m.group(2))
            name, version, run_id = mv.name, mv.version, mv.run_id
        elif m := re.fullmatch(r"models:/([^/@]+)/(\d+)", uri):
            mv = client.get_model_version(m.group(1), m.group(2))
            name, version, run_id = mv.name, mv.version, mv.run_id
        elif m := re.fullmatch(r"runs:/([0-9a-f]+)/(.+)", uri):
            run_id = m.group(1)
            client.get_run(run_id)
            found = client.search_model_versions(f"run_id='{run_id}'")
            if found:
                mv = max(found, key=lambda v: int(v.version))
                name, version = mv.name, mv.version
        elif not uri.startswith("models:/m-"):
            raise PipelineError(f"model URI {uri!r} is not runs:/RUN/model, models:/NAME/VERSION or models:/NAME@ALIAS")
        version = str(version) if version is not None else None
        load_uri = f"models:/{name}/{version}" if name else uri
        info = mlflow.models.get_model_info(load_uri)
    except MlflowException as exc:
        raise PipelineError(f"model {uri} not found: {first_line(exc)}") from None
    meta = info.metadata or {}
    if "shape" not in meta or "label_names" not in meta:
        raise PipelineError(f"model {uri} was not logged by sparkvision (no shape/label_names metadata)")
    return ResolvedModel(uri, load_uri, name, version, run_id, tuple(meta["shape"]), list(meta["label_names"]))


def latest_version_uri(name: str) -> str:
    """models:/NAME/<highest version>, or a clear error when nothing is registered."""
    import mlflow

    versions = mlflow.MlflowClient().search_model_versions(f"name='{name}'")
    if not versions:
        raise PipelineError(f"no registered versions of model '{name}' (run `sparkvision train` first)")
    return f"models:/{name}/{max(int(v.version) for v in versions)}"


def alias_version(name: str, alias: str) -> str | None:
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        return str(mlflow.MlflowClient().get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None
