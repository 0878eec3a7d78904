"""`tune.space`: per `train.*` key a distribution (`{choice: [...]}`, `{float: [lo, hi], log: true}`,
`{int: [lo, hi]}`), validated against the config's own types and ranges; Optuna suggests from it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipelines.config import Config, ConfigError, overlay

# set by the study itself, not searchable
FIXED_KEYS = {"train.dataset", "train.num_proc", "train.epochs", "train.timeout_s"}


@dataclass(frozen=True)
class Param:
    """One searched key and its distribution."""
    key: str
    kind: str  # choice | float | int
    choices: tuple[Any, ...] = ()
    low: float = 0.0
    high: float = 0.0
    log: bool = False


def parse_space(cfg: Config) -> list[Param]:
    """The validated search space; an empty space, an unknown key or a bad range is a ConfigError naming the key."""
    space = cfg.tune.space
    if not space:
        raise ConfigError("tune.space is empty: give at least one train.* key to search (see conf/tune/cnn.yaml)")
    params = [parse_param(key, spec) for key, spec in space.items()]
    for p in params:
        for value in (p.choices if p.kind == "choice" else (p.low, p.high)):
            overlay(cfg, {p.key: value}, f"tune.space.{p.key}")  # the value must be one train accepts
    return params


def parse_param(key: str, spec: Any) -> Param:
    """One `tune.space` entry."""
    where = f"tune.space.{key}"
    if not key.startswith("train."):
        raise ConfigError(f"{where}: only train.* keys can be searched")
    if key in FIXED_KEYS:
        raise ConfigError(f"{where}: set by the study (tune.epochs, one worker per trial), not searchable")
    if not isinstance(spec, dict) or len(set(spec) - {"log"}) != 1:
        raise ConfigError(f"{where}: expected {{choice: [...]}}, {{float: [lo, hi], log: true}} or {{int: [lo, hi]}}, "
                          f"got {spec!r}")
    kind = next(k for k in spec if k != "log")
    value, log = spec[kind], spec.get("log", False)
    if kind == "choice":
        if not isinstance(value, list) or not value:
            raise ConfigError(f"{where}.choice: must be a non-empty list")
        return Param(key, "choice", choices=tuple(value))
    if kind not in ("float", "int"):
        raise ConfigError(f"{where}: unknown distribution '{kind}' (choice, float or int)")
    if not isinstance(log, bool):
        raise ConfigError(f"{where}.log: must be true or false")
    numeric = (int,) if kind == "int" else (int, float)
    if (not isinstance(value, list) or len(value) != 2
            or not all(isinstance(v, numeric) and not isinstance(v, bool) for v in value)):
        raise ConfigError(f"{where}.{kind}: must be [low, high] ({kind} values), got {value!r}")
    low, high = value
    if not low < high:
        raise ConfigError(f"{where}.{kind}: low {low} must be below high {high}")
    if log and low <= 0:
        raise ConfigError(f"{where}.{kind}: a log range needs low > 0, got {low}")
    return Param(key, kind, low=low, high=high, log=log)


def suggest(trial: Any, params: list[Param]) -> dict[str, Any]:
    """One point of the space, from an Optuna trial: {train.key: value}."""
    out: dict[str, Any] = {}
    for p in params:
        if p.kind == "choice":
            out[p.key] = trial.suggest_categorical(p.key, list(p.choices))
        elif p.kind == "float":
            out[p.key] = trial.suggest_float(p.key, p.low, p.high, log=p.log)
        else:
            out[p.key] = trial.suggest_int(p.key, int(p.low), int(p.high), log=p.log)
    return out


def as_overlay(values: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """{train.key: v} -> {train: {key: v}}: a config overlay file's shape."""
    out: dict[str, dict[str, Any]] = {}
    for key, value in values.items():
        section, name = key.split(".", 1)
        out.setdefault(section, {})[name] = value
    return out
