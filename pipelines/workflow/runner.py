"""Run a workflow's tasks locally in dependency order, each as its own spark-submit process (a job cluster per
task), with retries, timeouts, task values handed downstream, and a run record per run."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pipelines.config import Config, resolve_path
from pipelines.console import say
from pipelines.environment import TASK_RUN_FILE_VAR, child_env
from pipelines.secrets import redact
from pipelines.spark import driver_java_options
from pipelines.workflow.definition import Task, Workflow, substitute

SUCCESS, FAILED, TIMED_OUT, UPSTREAM_FAILED, CANCELLED, REUSED, EXCLUDED = (
    "SUCCESS", "FAILED", "TIMEDOUT", "UPSTREAM_FAILED", "CANCELLED", "REUSED", "EXCLUDED")
SUCCEEDED = (SUCCESS, REUSED)
NOT_RUN_BY_CHOICE = (EXCLUDED,)  # a condition's other branch, or a run_if not met: not a failure


def run_if_verdict(run_if: str, deps: dict[str, str], outcomes_met: bool) -> tuple[str, str] | None:
    """Whether a task runs given its dependencies' statuses (Databricks' run_if), or the status it gets instead
    and why. A dependency on a condition's other outcome excludes the task."""
    if not outcomes_met:
        return EXCLUDED, "a condition it depends on had the other outcome"
    ok = [k for k, v in deps.items() if v in SUCCEEDED]
    excluded = [k for k, v in deps.items() if v in NOT_RUN_BY_CHOICE]
    bad = [k for k in deps if k not in ok and k not in excluded]
    runs = {"ALL_SUCCESS": len(ok) == len(deps), "AT_LEAST_ONE_SUCCESS": bool(ok) or not deps,
            "NONE_FAILED": not bad and (bool(ok) or not deps), "ALL_DONE": True,
            "AT_LEAST_ONE_FAILED": bool(bad), "ALL_FAILED": bool(deps) and len(bad) == len(deps)}[run_if]
    if runs:
        return None
    if bad and run_if in ("ALL_SUCCESS", "AT_LEAST_ONE_SUCCESS", "NONE_FAILED"):
        return UPSTREAM_FAILED, f"upstream {', '.join(bad)} did not succeed"
    return EXCLUDED, f"run_if {run_if} not met ({', '.join(f'{k} {v}' for k, v in deps.items())})"


def condition_outcome(left: str, op: str, right: str) -> bool:
    """Databricks' condition_task: EQUAL_TO / NOT_EQUAL compare the strings; the others compare numbers."""
    if op == "EQUAL_TO":
        return left == right
    if op == "NOT_EQUAL":
        return left != right
    try:
        a, b = float(left), float(right)
    except ValueError:
        raise ValueError(f"{op} needs numbers, got {left!r} and {right!r}") from None
    return {"GREATER_THAN": a > b, "GREATER_THAN_OR_EQUAL": a >= b, "LESS_THAN": a < b,
            "LESS_THAN_OR_EQUAL": a <= b}[op]


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class RunRecord:
    """What `workflow runs` lists: one JSON file per run under <runs_root>/workflows/<job>/<run_id>/."""

    run_id: str
    job: str
    workflow_file: str
    status: str = "RUNNING"
    trigger: str = "manual"
    started: str = field(default_factory=now)
    ended: str | None = None
    conf: list[str] = field(default_factory=list)
    overrides: list[str] = field(default_factory=list)
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / "record.json.tmp"
        tmp.write_text(redact(json.dumps(self.__dict__, indent=2)))  # the --set values a user passed, too
        os.replace(tmp, directory / "record.json")

    @classmethod
    def load(cls, path: Path) -> "RunRecord":
        return cls(**json.loads(path.read_text()))


def runs_dir(cfg: Config, wf_key: str) -> Path:
    return resolve_path(cfg.paths.runs_root) / "workflows" / wf_key


def list_runs(cfg: Config) -> list[RunRecord]:
    root = resolve_path(cfg.paths.runs_root) / "workflows"
    records = [RunRecord.load(p) for p in root.glob("*/*/record.json")] if root.is_dir() else []
    return sorted(records, key=lambda r: r.started)


class StageEcho:
    """Shows a running task's own stage lines (`[train] epoch 3/12 ...`) as they are written to its log, and the
    line that says why it failed."""

    PATTERN = re.compile(r"^(\[(ingest|train|tune|experiment|evaluate|infer)\] |(config )?error: |stopped by SIG)")

    def __init__(self, log: Path):
        self.log, self.pos = log, 0

    def poll(self) -> None:
        with open(self.log, "rb") as fh:
            fh.seek(self.pos)
            chunk = fh.read()
        end = chunk.rfind(b"\n") + 1
        self.pos += end
        for line in chunk[:end].decode(errors="replace").splitlines():
            if self.PATTERN.match(line):
                print("  " + line, file=sys.stderr, flush=True)


class WorkflowRunner:
    """Runs one workflow run; `cancel()` (from a signal handler) stops the task in flight."""

    def __init__(self, cfg: Config, wf: Workflow, conf_files: list[str], overrides: list[str], verbose: bool = False):
        self.cfg, self.wf, self.conf_files, self.overrides, self.verbose = cfg, wf, conf_files, overrides, verbose
        self._proc: subprocess.Popen | None = None
        self._cancel = threading.Event()

    # ---------------------------------------------------------------------------------------- commands
    def _spark_submit(self) -> str:
        name = self.cfg.workflow.spark_submit
        if name == "spark-submit":
            beside = Path(sys.executable).parent / "spark-submit"
            return str(beside) if beside.exists() else name
        return name

    def command(self, task: Task, values: dict[str, dict[str, Any]]) -> list[str]:
        """The process a task runs: spark-submit FILE PARAMS --conf ... --set ..."""
        job_params = {"conf": "conf/base.yaml", **self.wf.parameters}
        if self.conf_files:  # the first file stands for {{job.parameters.conf}}; the rest follow it, in their order
            job_params["conf"] = self.conf_files[0]
        params = [substitute(p, job_params, values) for p in task.parameters]
        extra = [x for f in self.conf_files if f not in params for x in ("--conf", f)]
        extra += [x for o in self.overrides for x in ("--set", o)]
        if self.verbose:
            extra.append("--verbose")
        if task.python_file is not None:
            sc = self.cfg.spark
            # spark-submit starts the JVM before the job's code runs: its options (quiet: no INFO in task logs) go here
            options = driver_java_options(self.cfg, self.verbose)
            java = ["--driver-java-options", options] if options else []
            return [self._spark_submit(), "--master", sc.master, "--driver-memory", sc.driver_memory, *java,
                    "--conf", f"spark.pyspark.python={sys.executable}", str(task.python_file), *params, *extra]
        return [sys.executable, "-m", "pipelines.cli", *params, *extra]

    # ----------------------------------------------------------------------------------------- running
    def cancel(self) -> None:
        self._cancel.set()
        proc = self._proc
        if proc and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)

    def _attempt(self, cmd: list[str], log: Path, timeout: int, task_run_file: Path) -> tuple[str, int | None]:
        env = child_env(PYSPARK_PYTHON=sys.executable, **{TASK_RUN_FILE_VAR: str(task_run_file)})
        with open(log, "w") as fh:
            fh.write(redact(f"$ {' '.join(cmd)}\n"))
            fh.flush()
            self._proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env,
                                          start_new_session=True, cwd=os.getcwd())
            deadline = time.monotonic() + timeout if timeout else None
            echo = StageEcho(log)
            while self._proc.poll() is None:
                echo.poll()
                if self._cancel.is_set():
                    self._stop(self._proc)
                    return CANCELLED, None
                if deadline and time.monotonic() > deadline:
                    self._stop(self._proc)
                    fh.write(f"\n[workflow] killed after timeout_seconds={timeout}\n")
                    return TIMED_OUT, None
                time.sleep(self.cfg.workflow.poll_seconds)
        echo.poll()
        code = self._proc.returncode
        if self._cancel.is_set():  # stopped by cancel() (SIGTERM to the scheduler), not a task failure
            return CANCELLED, code
        return (SUCCESS if code == 0 else FAILED), code

    @staticmethod
    def _stop(proc: subprocess.Popen) -> None:
        """SIGTERM the task's whole process group, then SIGKILL what is left."""
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        except ProcessLookupError:
            pass

    @staticmethod
    def task_values(log: Path) -> dict[str, Any]:
        """A job's last stdout line is its JSON result: those keys are the task's values."""
        for line in reversed(log.read_text(errors="replace").splitlines()):
            line = line.strip()
            if line.startswith("{") and line.endswith("}"):
                try:
                    return json.loads(line)
                except json.JSONDecodeError:
                    continue
        return {}

    def _blocked(self, task: Task, record: RunRecord) -> tuple[str, str] | None:
        deps = {d: record.tasks.get(d, {}).get("status") for d in task.depends_on}
        met = all(record.tasks.get(d, {}).get("outcome") == want for d, want in task.outcomes)
        return run_if_verdict(task.run_if, deps, met)

    def _decide(self, task: Task, entry: dict[str, Any], values: dict[str, dict[str, Any]]) -> None:
        """A condition_task: resolve both sides, compare, record the outcome (no process)."""
        c = task.condition
        try:
            left, right = (substitute(x, self.wf.parameters, values) for x in (c.left, c.right))
            outcome = "true" if condition_outcome(left, c.op, right) else "false"
        except (KeyError, ValueError) as exc:
            entry.update(status=FAILED, ended=now(), error=str(exc))
            say("workflow", f"{task.key}: FAILED: {exc}")
            return
        entry.update(status=SUCCESS, ended=now(), outcome=outcome, condition=f"{left!r} {c.op} {right!r}")
        values[task.key] = entry["values"] = {"outcome": outcome}
        say("workflow", f"{task.key}: {outcome} ({left!r} {c.op} {right!r})")

    def _run_attempts(self, task: Task, entry: dict[str, Any], values: dict[str, dict[str, Any]], run_dir: Path,
                      record: RunRecord) -> None:
        """Run a task's process, retried up to max_retries; its status and, on success, its values."""
        key = task.key
        timeout = task.timeout_seconds or self.cfg.workflow.default_timeout_seconds
        status = FAILED
        for attempt in range(task.max_retries + 1):
            if attempt and task.min_retry_interval_ms:
                time.sleep(task.min_retry_interval_ms / 1000)
            n = len(entry["attempts"]) + 1
            log = run_dir / f"{key}.attempt{n}.log"
            try:
                cmd = self.command(task, values)
            except KeyError as exc:
                log.write_text(f"[workflow] {exc}\n")
                entry["attempts"].append({"attempt": n, "status": FAILED, "log": str(log), "error": str(exc)})
                status = FAILED
                break
            t0 = time.monotonic()
            status, code = self._attempt(cmd, log, timeout, run_dir / f"{key}.run")
            took = time.monotonic() - t0
            entry["attempts"].append({"attempt": n, "status": status, "exit_code": code, "log": str(log),
                                      "seconds": round(took, 1), "started": entry["started"], "ended": now()})
            entry["log"] = str(log)
            record.save(run_dir)
            say("workflow", f"{key}: {status} in {took:.0f}s (attempt {n}) log {log}")
            if status in (SUCCESS, CANCELLED):
                break
        entry.update(status=status, ended=now())
        if status == SUCCESS:
            values[key] = entry["values"] = self.task_values(Path(entry["log"]))

    def run(self, repair_from: str | None = None, trigger: str = "manual") -> RunRecord:
        """Run every task (or, with repair_from, that task and its dependents on the last run)."""
        base = runs_dir(self.cfg, self.wf.key)
        if repair_from:
            previous = list_runs_for(self.cfg, self.wf.key)
            if not previous:
                raise ValueError(f"no earlier run of {self.wf.key} to repair")
            if repair_from not in self.wf.tasks:
                raise ValueError(f"--from {repair_from}: no such task (tasks: {', '.join(self.wf.tasks)})")
            record = previous[-1]
            record.status, record.ended = "RUNNING", None
            rerun = self.wf.downstream(repair_from)
            for key in self.wf.tasks:
                if key not in rerun and record.tasks.get(key, {}).get("status") not in (*SUCCEEDED, EXCLUDED):
                    raise ValueError(f"--from {repair_from}: upstream task {key!r} did not succeed in run "
                                     f"{record.run_id}; repair from it instead")
        else:
            stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
            record = RunRecord(f"{stamp}-{uuid.uuid4().hex[:6]}", self.wf.key, str(self.wf.path), trigger=trigger,
                               conf=list(self.conf_files), overrides=list(self.overrides))
            rerun = set(self.wf.tasks)
        run_dir = base / record.run_id
        record.save(run_dir)
        say("workflow", f"run {record.run_id} of {self.wf.name}: {' -> '.join(self.wf.order())}"
                        + (f" (repair from {repair_from})" if repair_from else ""))
        values: dict[str, dict[str, Any]] = {k: v.get("values", {}) for k, v in record.tasks.items()}
        for key in self.wf.order():
            task = self.wf.tasks[key]
            entry = record.tasks.setdefault(key, {"attempts": []})
            if key not in rerun:
                entry["status"] = REUSED if entry.get("status") in (SUCCESS, REUSED) else entry.get("status")
                say("workflow", f"{key}: reused from the earlier attempt")
                continue
            blocked = self._blocked(task, record) if not self._cancel.is_set() else (CANCELLED, "cancelled")
            if blocked:
                entry.update(status=blocked[0], reason=blocked[1])
                if blocked[0] == EXCLUDED:
                    say("workflow", f"{key}: skipped ({blocked[1]})")
                record.save(run_dir)
                continue
            entry.update(status="RUNNING", started=now(), values={})
            if task.condition is not None:
                self._decide(task, entry, values)
            else:
                self._run_attempts(task, entry, values, run_dir, record)
            record.save(run_dir)
        statuses = {v.get("status") for v in record.tasks.values()}
        record.status = (CANCELLED if CANCELLED in statuses else
                         FAILED if statuses - {*SUCCEEDED, *NOT_RUN_BY_CHOICE} else SUCCESS)
        record.ended = now()
        record.save(run_dir)
        return record


def list_runs_for(cfg: Config, key: str) -> list[RunRecord]:
    return [r for r in list_runs(cfg) if r.job == key]
