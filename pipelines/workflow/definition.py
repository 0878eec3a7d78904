"""Workflow definitions in the Databricks Jobs format, validated with Databricks' own job model.

A file holds either a bundle-style `resources: {jobs: {KEY: JOB}}` mapping or one job object. Validation goes
through `databricks.bundles.jobs.Job.from_dict`, which rejects unknown fields, so what runs here is what
Databricks would accept.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pipelines.config import ConfigError
from pipelines.errors import first_line

REF = re.compile(r"\{\{\s*([a-zA-Z0-9_.\-]+)\s*\}\}")


@dataclass(frozen=True)
class Condition:
    """A condition_task: `left op right` once references are resolved; its outcome is "true" or "false"."""
    left: str
    op: str  # EQUAL_TO, NOT_EQUAL, GREATER_THAN, GREATER_THAN_OR_EQUAL, LESS_THAN, LESS_THAN_OR_EQUAL
    right: str


@dataclass(frozen=True)
class Task:
    key: str
    depends_on: tuple[str, ...]
    python_file: Path | None       # spark_python_task
    entry_point: str | None        # python_wheel_task (runs `sparkvision` with the parameters)
    parameters: tuple[str, ...]
    max_retries: int
    min_retry_interval_ms: int
    timeout_seconds: int
    condition: Condition | None = None  # condition_task: evaluated by the runner, no process
    outcomes: tuple[tuple[str, str], ...] = ()  # (dependency, the outcome it must have had) for depends_on.outcome
    run_if: str = "ALL_SUCCESS"


@dataclass(frozen=True)
class Workflow:
    key: str
    name: str
    path: Path
    tasks: dict[str, Task]
    parameters: dict[str, str]
    cron: str | None
    timezone: str
    max_concurrent_runs: int

    def order(self) -> list[str]:
        """Tasks in dependency order (stable: definition order among ready tasks)."""
        done: list[str] = []
        pending = list(self.tasks)
        while pending:
            ready = [k for k in pending if all(d in done for d in self.tasks[k].depends_on)]
            if not ready:
                raise ConfigError(f"{self.path}: tasks {', '.join(pending)} form a dependency cycle")
            done.append(ready[0])
            pending.remove(ready[0])
        return done

    def downstream(self, key: str) -> set[str]:
        """`key` and every task that depends on it, directly or not."""
        out = {key}
        changed = True
        while changed:
            changed = False
            for k, t in self.tasks.items():
                if k not in out and out.intersection(t.depends_on):
                    out.add(k)
                    changed = True
        return out


def _job_dict(data: dict[str, Any], path: Path) -> tuple[str, dict[str, Any]]:
    jobs = (data.get("resources") or {}).get("jobs") if isinstance(data, dict) else None
    if jobs:
        if len(jobs) != 1:
            raise ConfigError(f"{path}: expected one job under resources.jobs, found {', '.join(jobs)}")
        return next(iter(jobs.items()))
    if isinstance(data, dict) and "tasks" in data:
        return path.stem, data
    raise ConfigError(f"{path}: no job found (expected resources.jobs.<key> or a job with tasks)")


def load_workflow(path: str | Path) -> Workflow:
    """Parse and validate a workflow file; every problem is a ConfigError naming the file."""
    from databricks.bundles.jobs import Job

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"workflow file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {first_line(exc)}") from None
    key, raw = _job_dict(data, path)
    try:
        job = Job.from_dict(raw)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{path}: not a valid Databricks job: {exc}") from None
    tasks: dict[str, Task] = {}
    for t in job.tasks or []:
        if t.task_key in tasks:
            raise ConfigError(f"{path}: duplicate task_key {t.task_key!r}")
        tasks[t.task_key] = _task(t, path)
    if not tasks:
        raise ConfigError(f"{path}: the job has no tasks")
    for t in tasks.values():
        for d in t.depends_on:
            if d not in tasks:
                raise ConfigError(f"{path}: task {t.key!r} depends on unknown task {d!r}")
        for d, _ in t.outcomes:
            if tasks[d].condition is None:
                raise ConfigError(f"{path}: task {t.key!r} asks for an outcome of {d!r}, which is not a condition_task")
    params = {p.name: str(p.default) for p in (job.parameters or [])}
    wf = Workflow(key=key, name=str(job.name or key), path=path.resolve(), tasks=tasks, parameters=params,
                  cron=job.schedule.quartz_cron_expression if job.schedule else None,
                  timezone=(job.schedule.timezone_id if job.schedule else None) or "UTC",
                  max_concurrent_runs=int(job.max_concurrent_runs or 1))
    wf.order()  # cycles are errors now, not at run time
    return wf


def _task(t: Any, path: Path) -> Task:
    """One validated task of the Databricks job model as the local runner runs it."""
    condition = None
    if t.spark_python_task:
        py, params, entry = (path.parent / t.spark_python_task.python_file).resolve(), t.spark_python_task.parameters, None
    elif t.python_wheel_task:
        py, params, entry = None, t.python_wheel_task.parameters, t.python_wheel_task.entry_point
    elif t.condition_task:
        c = t.condition_task
        py, params, entry = None, [], None
        condition = Condition(str(c.left), _enum_value(c.op), str(c.right))
    else:
        raise ConfigError(f"{path}: task {t.task_key!r}: only spark_python_task, python_wheel_task and condition_task "
                          "run locally")
    if py is not None and not py.is_file():
        raise ConfigError(f"{path}: task {t.task_key!r}: python_file {py} not found")
    deps = t.depends_on or []
    return Task(key=t.task_key, depends_on=tuple(d.task_key for d in deps), python_file=py, entry_point=entry,
                parameters=tuple(str(p) for p in (params or [])), max_retries=int(t.max_retries or 0),
                min_retry_interval_ms=int(t.min_retry_interval_millis or 0),
                timeout_seconds=int(t.timeout_seconds or 0), condition=condition,
                outcomes=tuple((d.task_key, str(d.outcome).lower()) for d in deps if d.outcome),
                run_if=_enum_value(t.run_if) if t.run_if else "ALL_SUCCESS")


def _enum_value(v: Any) -> str:
    return str(getattr(v, "value", v))


def substitute(text: str, job_params: dict[str, str], values: dict[str, dict[str, Any]]) -> str:
    """Resolve `{{job.parameters.X}}` and `{{tasks.T.values.K}}` like Databricks dynamic value references."""
    def one(m: re.Match) -> str:
        ref = m.group(1).split(".")
        if ref[:2] == ["job", "parameters"] and len(ref) == 3 and ref[2] in job_params:
            return job_params[ref[2]]
        if len(ref) == 4 and ref[0] == "tasks" and ref[2] == "values":
            task_values = values.get(ref[1])
            if task_values is None or ref[3] not in task_values:
                raise KeyError(f"{m.group(0)}: task {ref[1]!r} set no value {ref[3]!r}")
            value = task_values[ref[3]]
            return json.dumps(value) if isinstance(value, bool) or value is None else str(value)  # true, not True
        raise KeyError(f"{m.group(0)}: unknown reference")
    return REF.sub(one, text)
