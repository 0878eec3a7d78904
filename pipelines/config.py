"""Typed configuration: conf/base.yaml, then overlay files, then `--set key.path=value`, validated once.

Every error names the key and the file (or `--set`) it came from; nothing else in the package reads YAML.
"""
from __future__ import annotations

import copy
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from pipelines.errors import first_line

# A checkout reads <repo>/conf; an installed wheel carries a copy in pipelines/conf (see setup.py).
_PACKAGED = Path(__file__).resolve().parent / "conf"
CONF_DIR = _PACKAGED if (_PACKAGED / "base.yaml").is_file() else Path(__file__).resolve().parent.parent / "conf"
BASE_FILE = CONF_DIR / "base.yaml"


class ConfigError(ValueError):
    """A configuration problem the user must fix; the CLI prints it as one line and exits 2."""


@dataclass(frozen=True)
class Paths:
    datasets_root: str
    checkpoints_root: str
    runs_root: str
    predictions_root: str
    studies_root: str


@dataclass(frozen=True)
class SparkConfig:
    master: str
    app_name: str
    driver_memory: str
    driver_java_options: str
    executor_memory: str
    shuffle_partitions: int
    arrow_batch_size: int
    extra_conf: dict[str, str]


@dataclass(frozen=True)
class MlflowConfig:
    tracking_uri: str
    artifact_location: Optional[str]
    experiment: str
    registered_model: str
    system_metrics_seconds: float


@dataclass(frozen=True)
class SourceConfig:
    type: Literal["idx", "folder", "table"]
    path: str
    path_column: str
    label_column: str
    label_names: Optional[list[str]]
    idx_label_names: list[str]


@dataclass(frozen=True)
class ImageConfig:
    height: int
    width: int
    channels: Literal[1, 3]
    resize_policy: Literal["resize", "pad", "center_crop"]
    background: list[int]


@dataclass(frozen=True)
class SplitConfig:
    validation: float
    test: float


@dataclass(frozen=True)
class EncodingConfig:
    format: Literal["jpeg", "png"]
    quality: int


@dataclass(frozen=True)
class IngestConfig:
    name: str
    source: SourceConfig
    image: ImageConfig
    max_pixels: int
    split: SplitConfig
    balance: Literal["none", "oversample"]
    skew_classes: list[str]
    skew_fraction: float
    row_group_rows: int
    files_per_split: int
    storage: Literal["pixels", "encoded"]
    encoding: EncodingConfig


@dataclass(frozen=True)
class AugmentConfig:
    translate: float
    flip: Literal["horizontal", "vertical", "horizontal_and_vertical", "none"]
    rotate: float
    zoom: float
    brightness: float
    contrast: float


TRANSFER_MODELS = ("mobilenet_v2", "efficientnet_b0", "resnet50")  # train.model values that are backbones


# A train.* key whose field carries this may differ when a run is resumed (how long, on how many workers, how it is
# fed); every other key is the run's recipe, and a resume that changes one would continue another run.
RESUMABLE = {"resume": "may change"}


@dataclass(frozen=True)
class TrainConfig:
    dataset: Optional[str] = field(metadata=RESUMABLE)  # the resume check compares the resolved NAME/VERSION
    model: Literal["mnist_cnn", "lenet5", "vgg_small", "small_resnet", "plain_cnn", "mobilenet_v2", "efficientnet_b0",
                   "resnet50"]
    pretrained_weights: Optional[str]
    freeze_backbone_epochs: int
    unfreeze_layers: int
    finetune_lr_factor: float
    activation: Literal["relu", "leaky_relu", "elu", "selu", "tanh", "sigmoid"]
    dropout: float
    l2: float
    width: float
    conv_blocks: int
    dense_layers: int
    normalization: Literal["standardize", "scale", "raw"]
    loss: Literal["cross_entropy", "label_smoothing", "focal", "mse"]
    label_smoothing: float
    focal_gamma: float
    num_proc: int = field(metadata=RESUMABLE)
    epochs: int = field(metadata=RESUMABLE)
    batch_size: int
    optimizer: Literal["sgd", "momentum", "nesterov", "adam", "adadelta", "rmsprop", "adagrad"]
    learning_rate: float
    scale_lr: bool
    momentum: float
    schedule: Literal["constant", "plateau", "cosine"]
    warmup_epochs: int
    early_stopping_patience: int = field(metadata=RESUMABLE)
    restore_best_weights: bool = field(metadata=RESUMABLE)
    class_weights: bool
    augment: bool
    augmentation: AugmentConfig
    shuffle_buffer: int = field(metadata=RESUMABLE)
    cache_mb: int = field(metadata=RESUMABLE)
    reader_threads: int = field(metadata=RESUMABLE)
    bind_cores: bool = field(metadata=RESUMABLE)
    seed: int
    mixed_precision: Literal["auto", "on", "off", "float16", "bfloat16"]
    fp16_allreduce: bool = field(metadata=RESUMABLE)
    horovod_cycle_time_ms: Optional[float] = field(metadata=RESUMABLE)
    horovod_timeline: bool = field(metadata=RESUMABLE)
    max_restarts: int = field(metadata=RESUMABLE)
    elastic: bool = field(metadata=RESUMABLE)
    elastic_min_workers: int = field(metadata=RESUMABLE)
    elastic_commit_steps: int = field(metadata=RESUMABLE)
    timeout_s: int = field(metadata=RESUMABLE)


def recipe_keys() -> tuple[str, ...]:
    """The train.* keys a resume must not change (every field of TrainConfig not marked RESUMABLE), nested
    sections as their dotted leaves, as MLflow params name them."""
    hints = typing.get_type_hints(TrainConfig)
    keys = []
    for f in dataclasses.fields(TrainConfig):
        if f.metadata == RESUMABLE:
            continue
        nested = hints[f.name]
        keys += ([f"train.{f.name}.{g.name}" for g in dataclasses.fields(nested)]
                 if dataclasses.is_dataclass(nested) else [f"train.{f.name}"])
    return tuple(keys)


@dataclass(frozen=True)
class EvaluateConfig:
    model_uri: Optional[str]
    split: Literal["train", "validation", "test"]
    top_k: int
    threshold: float
    misclassified_examples: int


@dataclass(frozen=True)
class InferConfig:
    model_uri: Optional[str]
    input_type: Literal["dataset", "files", "table", "stream"]
    input: Optional[str]
    image_column: str
    key_columns: list[str]
    output: Optional[str]
    partition_by: list[str]
    batch_size: int
    top_k: int
    trigger: Literal["processing_time", "available_now"]
    trigger_seconds: float
    max_files_per_trigger: int


@dataclass(frozen=True)
class PrunerConfig:
    startup_trials: int
    warmup_epochs: int


@dataclass(frozen=True)
class TuneConfig:
    study: Optional[str]
    trials: int
    parallelism: int
    epochs: int
    timeout_s: float
    max_train_rows: int
    sampler_seed: int
    pruner: PrunerConfig
    seeds: list[int]
    enqueue: list[dict[str, Any]]
    space: dict[str, Any]


@dataclass(frozen=True)
class WorkflowConfig:
    spark_submit: str
    poll_seconds: float
    default_timeout_seconds: int


@dataclass(frozen=True)
class ClusterConfig:
    host: str
    master_port: int
    master_webui_port: int
    workers: int
    worker_cores: int
    worker_memory: str
    mlflow_port: int
    mlflow_auth: bool
    state_dir: str


@dataclass(frozen=True)
class Config:
    paths: Paths
    spark: SparkConfig
    mlflow: MlflowConfig
    ingest: IngestConfig
    train: TrainConfig
    evaluate: EvaluateConfig
    infer: InferConfig
    tune: TuneConfig
    workflow: WorkflowConfig
    cluster: ClusterConfig
    sources: tuple[str, ...] = field(default=(), compare=False)  # files merged, for messages and logging

    def to_dict(self) -> dict[str, Any]:
        """The effective config as plain data (what --print-config shows and MLflow records)."""
        data = dataclasses.asdict(self)
        data.pop("sources")
        return data


# ---------------------------------------------------------------------------------------------- loading

def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {first_line(exc)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return data


def _merge(base: dict, overlay: dict, origin: dict[str, str], source: str, prefix: str = "") -> None:
    """Merge `overlay` into `base` in place; record which source set each leaf key."""
    for key, value in overlay.items():
        dotted = f"{prefix}{key}"
        if key not in base:
            raise ConfigError(f"{source}: unknown key '{dotted}'")
        if isinstance(base[key], dict) and isinstance(value, dict) and not _is_free_mapping(dotted):
            _merge(base[key], value, origin, source, dotted + ".")
        else:
            base[key] = copy.deepcopy(value)
            origin[dotted] = source


def _is_free_mapping(dotted: str) -> bool:
    """Mappings whose keys are the user's (Spark conf, tuning space), not ours."""
    return dotted in {"spark.extra_conf", "tune.space"}


def _origins(data: dict, source: str, prefix: str = "") -> dict[str, str]:
    out = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        out[dotted] = source
        if isinstance(value, dict) and not _is_free_mapping(dotted):
            out.update(_origins(value, source, dotted + "."))
    return out


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b=value` -> ("a.b", value parsed as YAML, so 3 is int, true is bool, [a, b] is a list)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key.path=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def _nest(key: str, value: Any) -> dict:
    out: Any = value
    for part in reversed(key.split(".")):
        out = {part: out}
    return out


def shipped_overlays() -> list[str]:
    """The overlays that come with sparkvision, as `conf/...` names (base.yaml is always loaded, so not listed)."""
    return sorted(f"conf/{p.relative_to(CONF_DIR).as_posix()}" for p in CONF_DIR.rglob("*.yaml")
                  if p != BASE_FILE and p.parent.name != "experiments")  # experiments are not overlays


def overlay_file(name: str | Path) -> Path:
    """The file an overlay name means: the path as given when it exists, else the shipped overlay of that name.

    An installed wheel has no conf/ folder beside the user, so `conf/local.yaml`, `local.yaml` or
    `conf/profiles/accurate.yaml` fall back to the copies packaged in pipelines/conf."""
    path = Path(name)
    if path.is_file() or path.is_absolute():
        return path
    parts = path.parts[1:] if path.parts[:1] == ("conf",) else path.parts
    shipped = CONF_DIR.joinpath(*parts) if parts else CONF_DIR
    if shipped.is_file():
        return shipped
    raise ConfigError(f"config file not found: {path} (shipped overlays: {', '.join(shipped_overlays())})")


def overlay_name(path: str | Path) -> str:
    """How to name an overlay in a command to copy: `conf/...` for a shipped one when that name means the same file
    from here (so no site-packages path), else the path as recorded."""
    p = Path(path)
    if p.is_absolute() and p.is_relative_to(CONF_DIR):
        short = f"conf/{p.relative_to(CONF_DIR).as_posix()}"
        try:
            if overlay_file(short).resolve() == p.resolve():
                return short
        except ConfigError:
            pass
    return str(path)


def load_config(files: list[str | Path] = (), overrides: list[str] = ()) -> Config:
    """Load base.yaml, merge `files` in order, apply `overrides`, and validate into a Config."""
    data = _read_yaml(BASE_FILE)
    origin = _origins(data, str(BASE_FILE))
    sources = [str(BASE_FILE)]
    for f in files:
        path = overlay_file(f)
        if path.resolve() == BASE_FILE.resolve():
            continue
        _merge(data, _read_yaml(path), origin, str(path))
        sources.append(str(path))
    for text in overrides:
        key, value = parse_override(text)
        _merge(data, _nest(key, value), origin, "--set")
    cfg = _build(Config, data, origin, "", tuple(sources))
    _check_ranges(cfg, origin)
    return cfg


def overlay(cfg: Config, values: dict[str, Any], source: str) -> Config:
    """`cfg` with dotted `values` set as if by `source` (a tuning trial, an experiment variant), validated like a
    file: an unknown key or a wrong type is a ConfigError naming the key and `source`."""
    data = cfg.to_dict()
    origin = {**_origins(data, str(BASE_FILE)), **{k: source for k in values}}
    for key, value in values.items():
        _merge(data, _nest(key, value), origin, source)
    new = _build(Config, data, origin, "", cfg.sources)
    _check_ranges(new, origin)
    return new


def _check_ranges(cfg: Config, origin: dict[str, str]) -> None:
    """Value checks a type cannot express; each names the key and where it was set."""
    checks = [
        ("ingest.image.height", cfg.ingest.image.height >= 8, "at least 8"),
        ("ingest.image.width", cfg.ingest.image.width >= 8, "at least 8"),
        ("ingest.image.background", len(cfg.ingest.image.background) == 3
         and all(0 <= v <= 255 for v in cfg.ingest.image.background), "three values in 0..255"),
        ("ingest.max_pixels", cfg.ingest.max_pixels > 0, "positive"),
        ("ingest.split.validation", 0 <= cfg.ingest.split.validation < 1, "in [0, 1)"),
        ("ingest.split.test", 0 <= cfg.ingest.split.test < 1, "in [0, 1)"),
        ("ingest.split.test", cfg.ingest.split.validation + cfg.ingest.split.test < 1,
         "such that validation + test < 1"),
        ("ingest.row_group_rows", cfg.ingest.row_group_rows >= 1, "at least 1"),
        ("ingest.files_per_split", cfg.ingest.files_per_split >= 1, "at least 1"),
        ("ingest.encoding.quality", 1 <= cfg.ingest.encoding.quality <= 100, "in 1..100"),
        ("train.num_proc", cfg.train.num_proc >= 1, "at least 1"),
        ("train.epochs", cfg.train.epochs >= 1, "at least 1"),
        ("train.timeout_s", cfg.train.timeout_s >= 1, "at least 1"),
        ("train.batch_size", cfg.train.batch_size >= 1, "at least 1"),
        ("train.cache_mb", cfg.train.cache_mb >= 0, "at least 0 (0 = stream every epoch)"),
        ("train.reader_threads", cfg.train.reader_threads >= 0, "at least 0 (0 = the cores per worker)"),
        ("train.max_restarts", cfg.train.max_restarts >= 0, "at least 0 (0 = a lost worker fails the run)"),
        ("train.elastic_min_workers", 1 <= cfg.train.elastic_min_workers <= cfg.train.num_proc,
         "in 1..train.num_proc"),
        ("train.elastic_commit_steps", cfg.train.elastic_commit_steps >= 1, "at least 1"),
        ("train.horovod_cycle_time_ms", cfg.train.horovod_cycle_time_ms is None or cfg.train.horovod_cycle_time_ms > 0,
         "greater than 0, or null"),
        ("train.learning_rate", cfg.train.learning_rate > 0, "positive"),
        ("train.dropout", 0 <= cfg.train.dropout < 1, "in [0, 1)"),
        ("train.width", cfg.train.width > 0, "positive"),
        ("train.conv_blocks", 1 <= cfg.train.conv_blocks <= 4, "in 1..4"),
        ("train.dense_layers", 0 <= cfg.train.dense_layers <= 4, "in 0..4"),
        ("train.label_smoothing", 0 <= cfg.train.label_smoothing < 1, "in [0, 1)"),
        ("train.focal_gamma", cfg.train.focal_gamma >= 0, "at least 0"),
        ("train.freeze_backbone_epochs", cfg.train.freeze_backbone_epochs >= 0, "at least 0"),
        ("train.unfreeze_layers", cfg.train.unfreeze_layers >= 0, "at least 0 (0 = all of the backbone)"),
        ("train.finetune_lr_factor", 0 < cfg.train.finetune_lr_factor <= 1, "in (0, 1]"),
        *[(key, cfg.train.model in TRANSFER_MODELS, f"only for the backbones ({', '.join(TRANSFER_MODELS)})")
          for key, used in (("train.pretrained_weights", cfg.train.pretrained_weights),
                            ("train.freeze_backbone_epochs", cfg.train.freeze_backbone_epochs)) if used],
        *[(f"train.augmentation.{key}", 0 <= getattr(cfg.train.augmentation, key) < 1, "in [0, 1)")
          for key in ("translate", "rotate", "zoom", "brightness", "contrast")],
        ("ingest.skew_fraction", 0 < cfg.ingest.skew_fraction <= 1, "in (0, 1]"),
        ("tune.trials", cfg.tune.trials >= 1, "at least 1"),
        ("tune.parallelism", cfg.tune.parallelism >= 1, "at least 1"),
        ("tune.epochs", cfg.tune.epochs >= 1, "at least 1"),
        ("tune.timeout_s", cfg.tune.timeout_s >= 0, "at least 0 (0 = no limit)"),
        ("tune.max_train_rows", cfg.tune.max_train_rows >= 0, "at least 0 (0 = the whole training split)"),
        ("tune.seeds", len(cfg.tune.seeds) >= 1, "a list of at least one seed"),
        ("tune.pruner.startup_trials", cfg.tune.pruner.startup_trials >= 0, "at least 0"),
        ("tune.pruner.warmup_epochs", cfg.tune.pruner.warmup_epochs >= 0, "at least 0"),
        ("mlflow.system_metrics_seconds", cfg.mlflow.system_metrics_seconds >= 0, "at least 0 (0 = off)"),
        ("evaluate.threshold", 0 <= cfg.evaluate.threshold <= 1, "in [0, 1]"),
        ("evaluate.top_k", cfg.evaluate.top_k >= 1, "at least 1"),
        ("infer.top_k", cfg.infer.top_k >= 1, "at least 1"),
        ("infer.batch_size", cfg.infer.batch_size >= 1, "at least 1"),
        ("infer.trigger_seconds", cfg.infer.trigger_seconds > 0, "greater than 0"),
        ("infer.max_files_per_trigger", cfg.infer.max_files_per_trigger >= 1, "at least 1"),
    ]
    for key, ok, what in checks:
        if not ok:
            raise ConfigError(f"{origin.get(key, str(BASE_FILE))}: '{key}' must be {what}")


# ------------------------------------------------------------------------------------------- validation

def _build(cls: type, data: Any, origin: dict[str, str], prefix: str, sources: tuple = ()):
    hints = typing.get_type_hints(cls)
    where = origin.get(prefix.rstrip("."), str(BASE_FILE)) if prefix else str(BASE_FILE)
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: '{prefix.rstrip('.')}' must be a mapping")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name == "sources":
            continue
        dotted = f"{prefix}{f.name}"
        if f.name not in data:
            raise ConfigError(f"{where}: missing required key '{dotted}'")
        kwargs[f.name] = _coerce(hints[f.name], data[f.name], dotted, origin)
    unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        key = f"{prefix}{sorted(unknown)[0]}"
        raise ConfigError(f"{origin.get(key, where)}: unknown key '{key}'")
    if cls is Config:
        kwargs["sources"] = sources
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, dotted: str, origin: dict[str, str]) -> Any:
    src = origin.get(dotted, str(BASE_FILE))
    fail = lambda what: ConfigError(f"{src}: '{dotted}' must be {what}, got {value!r}")  # noqa: E731
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, origin, dotted + ".")
    o = typing.get_origin(tp)
    args = typing.get_args(tp)
    if o in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, dotted, origin)
    if o is Literal:
        if isinstance(value, bool) and {"on", "off"} <= set(args):
            value = "on" if value else "off"  # YAML 1.1 reads a bare on/off as a boolean
        if isinstance(value, bool) or value not in args:  # True == 1 must not pass for Literal[1, 3]
            raise fail("one of " + ", ".join(map(str, args)))
        return value
    if o is list:
        if not isinstance(value, list):
            raise fail("a list")
        return [_coerce(args[0], v, f"{dotted}[{i}]", origin | {f"{dotted}[{i}]": src}) for i, v in enumerate(value)]
    if o is dict:
        if not isinstance(value, dict):
            raise fail("a mapping")
        return {str(k): (str(v) if args[1] is str else v) for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise fail("true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise fail("an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise fail("a number")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise fail("a string")
        return str(value)
    raise TypeError(f"unsupported config type {tp} for {dotted}")


def resolve_path(path: str) -> Path:
    """A config path as an absolute local path (relative paths are relative to the working directory)."""
    return Path(path).expanduser().resolve()


def dataset_ref(cfg: Config) -> str:
    """The dataset training reads: train.dataset or the ingest job's dataset name."""
    return cfg.train.dataset or cfg.ingest.name
