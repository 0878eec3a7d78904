"""Workflow definitions, the local DAG runner (real spark-submit processes) and the Quartz scheduler."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipelines.config import ConfigError
from pipelines.workflow.definition import load_workflow
from pipelines.workflow.runner import WorkflowRunner, condition_outcome, list_runs, run_if_verdict
from pipelines.workflow.schedule import quartz_to_cron

ROOT = Path(__file__).resolve().parents[2]


def test_shipped_workflow_and_bundle_parse_with_the_databricks_job_model():
    from databricks.bundles.jobs import Job

    wf = load_workflow(ROOT / "jobs/workflows/fashion_mnist.yaml")
    assert wf.order() == ["ingest", "train", "evaluate", "champion_exists", "infer"]
    assert wf.cron == "0 0 3 * * ?" and wf.timezone == "UTC"
    assert wf.tasks["train"].max_retries == 1 and wf.tasks["train"].timeout_seconds == 7200
    bundle = yaml.safe_load((ROOT / "databricks.yml").read_text())
    assert set(bundle["targets"]) == {"dev", "prod"}
    assert bundle["artifacts"]["sparkvision_wheel"]["build"].startswith("python")
    for key, job in bundle["resources"]["jobs"].items():
        parsed = Job.from_dict(job)
        kinds = {("wheel" if t.python_wheel_task else "python") for t in parsed.tasks}
        assert kinds and all(t.task_key for t in parsed.tasks), key
    included = [p for pattern in bundle["include"] for p in ROOT.glob(pattern)]
    assert ROOT / "jobs/workflows/fashion_mnist.yaml" in included
    assert ROOT / "jobs/workflows/tune_and_train.yaml" in included
    for path in included:
        for key, job in yaml.safe_load(path.read_text())["resources"]["jobs"].items():
            assert all(t.task_key for t in Job.from_dict(job).tasks), key


def test_the_tuning_workflow_hands_the_studys_best_yaml_to_train():
    wf = load_workflow(ROOT / "jobs/workflows/tune_and_train.yaml")
    assert wf.order() == ["ingest", "tune", "train", "evaluate", "champion_exists", "infer"]
    train = " ".join(wf.tasks["train"].parameters)
    assert "--conf {{tasks.tune.values.best_yaml}}" in train
    assert wf.tasks["tune"].python_file.name == "tune.py"


@pytest.mark.parametrize("job, message", [
    ({"name": "x", "tasks": [{"task_key": "a", "spark_python_task": {"python_file": "t.py"}, "retries": 1}]},
     "Unexpected field 'retries'"),
    ({"name": "x", "tasks": [{"task_key": "a", "depends_on": [{"task_key": "b"}], "spark_python_task": {"python_file": "t.py"}},
                             {"task_key": "b", "depends_on": [{"task_key": "a"}], "spark_python_task": {"python_file": "t.py"}}]},
     "dependency cycle"),
    ({"name": "x", "tasks": [{"task_key": "a", "depends_on": [{"task_key": "zz"}], "spark_python_task": {"python_file": "t.py"}}]},
     "unknown task 'zz'"),
])
def test_invalid_definitions_are_refused(tmp_path, job, message):
    (tmp_path / "t.py").write_text("print('{}')\n")
    f = tmp_path / "wf.yaml"
    f.write_text(yaml.safe_dump({"resources": {"jobs": {"x": job}}}))
    with pytest.raises(ConfigError, match=message):
        load_workflow(f)


@pytest.mark.parametrize("quartz, cron", [
    ("0 0 3 * * ?", "0 3 * * * 0"),
    ("0 15 10 ? * MON-FRI", "15 10 * * MON-FRI 0"),
    ("0 0 12 ? * 2,6", "0 12 * * 1,5 0"),
    ("*/5 * * * * ?", "* * * * * */5"),
    ("0 0 8 ? * 6#3", "0 8 * * 5#3 0"),
])
def test_quartz_expressions_translate(quartz, cron):
    assert quartz_to_cron(quartz) == cron


def test_bad_quartz_is_a_config_error():
    with pytest.raises(ConfigError):
        quartz_to_cron("0 0 3 * *")


TASK = '''
import json, os, sys, time
args = sys.argv[1:]
name = args[0]
marker = os.path.join(os.path.dirname(__file__), name + ".count")
n = int(open(marker).read()) + 1 if os.path.exists(marker) else 1
open(marker, "w").write(str(n))
if name == "flaky" and n == 1:
    sys.exit(3)                      # fails once, then succeeds on retry
if name == "broken" and not os.path.exists(os.path.join(os.path.dirname(__file__), "fixed")):
    sys.exit(4)
if name == "slow":
    time.sleep(60)
print("noise on stdout")
print(json.dumps({"task": name, "got": args[1:], "attempt": n, "run_file": os.environ.get("SPARKVISION_TASK_RUN_FILE")}))
'''


def toy_workflow(tmp_path: Path, tasks: list[dict]) -> Path:
    (tmp_path / "task.py").write_text(TASK)
    f = tmp_path / "wf.yaml"
    f.write_text(yaml.safe_dump({"resources": {"jobs": {"toy": {"name": "toy", "tasks": tasks}}}}))
    return f


def task(key, params, deps=(), **kw):
    return {"task_key": key, "depends_on": [{"task_key": d} for d in deps],
            "spark_python_task": {"python_file": "task.py", "parameters": params}, **kw}


@pytest.mark.fault('a secret passed with --set to a workflow run', kind='security',
                   shows='the run record and task logs show `***`')
@pytest.mark.slow
def test_runner_retries_hands_values_downstream_and_records_the_run(tmp_path, cfg_factory):
    f = toy_workflow(tmp_path, [
        task("first", ["flaky"], max_retries=1),
        task("second", ["second", "{{tasks.first.values.task}}-{{tasks.first.values.attempt}}"], ["first"]),
    ])
    cfg = cfg_factory("spark.master=local[1]")
    secret = "ingest.source.path=s3a://AKIA:hunter22@bucket/x"  # a password a user passed with --set
    record = WorkflowRunner(cfg, load_workflow(f), [], ["train.epochs=1", secret]).run()
    assert record.status == "SUCCESS"
    assert [a["status"] for a in record.tasks["first"]["attempts"]] == ["FAILED", "SUCCESS"]
    run_file = Path(record.tasks["first"]["log"]).parent / "record.json"
    assert "hunter22" not in run_file.read_text() and "s3a://AKIA:***@bucket/x" in run_file.read_text()
    assert all("hunter22" not in open(a["log"]).readline() for a in record.tasks["first"]["attempts"])
    assert record.tasks["second"]["values"]["got"][0] == "flaky-2"
    assert "--set" in record.tasks["second"]["values"]["got"]  # the runner hands --set to every task
    assert [r.run_id for r in list_runs(cfg)] == [record.run_id]
    # where a task's job records its MLflow run for its retries (train resumes it): one file per task and run
    run_dir = Path(record.tasks["first"]["log"]).parent
    assert record.tasks["first"]["values"]["run_file"] == str(run_dir / "first.run")
    assert record.tasks["second"]["values"]["run_file"] == str(run_dir / "second.run")


@pytest.mark.slow
def test_a_spark_task_log_holds_the_tasks_output_not_sparks_startup_info(tmp_path, cfg_factory):
    (tmp_path / "spark_task.py").write_text(
        "import json\nfrom pyspark.sql import SparkSession\n"
        "spark = SparkSession.builder.getOrCreate()\n"
        "print(json.dumps({'rows': spark.range(3).count()}))\nspark.stop()\n")
    f = tmp_path / "wf.yaml"
    f.write_text(yaml.safe_dump({"resources": {"jobs": {"one": {"name": "one", "tasks": [
        {"task_key": "count", "spark_python_task": {"python_file": "spark_task.py"}}]}}}}))
    record = WorkflowRunner(cfg_factory("spark.master=local[1]"), load_workflow(f), [], []).run()
    assert record.status == "SUCCESS" and record.tasks["count"]["values"] == {"rows": 3}
    log = Path(record.tasks["count"]["log"]).read_text()
    assert " INFO " not in log and " WARN " not in log, log[:3000]  # spark-submit's default log4j: ~40 lines


@pytest.mark.slow
def test_failure_stops_dependents_and_repair_reruns_from_the_failed_task(tmp_path, cfg_factory):
    f = toy_workflow(tmp_path, [
        task("a", ["a"]), task("b", ["broken"], ["a"]), task("c", ["c"], ["b"]), task("d", ["d"], ["a"]),
    ])
    cfg = cfg_factory("spark.master=local[1]")
    wf = load_workflow(f)
    failed = WorkflowRunner(cfg, wf, [], []).run()
    assert failed.status == "FAILED"
    assert failed.tasks["b"]["status"] == "FAILED" and failed.tasks["c"]["status"] == "UPSTREAM_FAILED"
    assert failed.tasks["d"]["status"] == "SUCCESS"
    (tmp_path / "fixed").write_text("")
    repaired = WorkflowRunner(cfg, wf, [], []).run(repair_from="b")
    assert repaired.run_id == failed.run_id and repaired.status == "SUCCESS"
    assert repaired.tasks["a"]["status"] == "REUSED"
    assert (tmp_path / "a.count").read_text() == "1"  # a did not run again
    assert len(repaired.tasks["b"]["attempts"]) == 2


@pytest.mark.fault('a workflow task past its timeout_seconds', kind='fault', shows='killed, TIMEDOUT')
@pytest.mark.slow
def test_timeout_kills_the_task(tmp_path, cfg_factory):
    f = toy_workflow(tmp_path, [task("s", ["slow"], timeout_seconds=8)])
    t0 = time.monotonic()
    record = WorkflowRunner(cfg_factory(), load_workflow(f), [], []).run()
    assert record.status == "FAILED" and record.tasks["s"]["status"] == "TIMEDOUT"
    assert time.monotonic() - t0 < 40


def test_cli_exit_codes_and_runs_listing(tmp_path):
    f = toy_workflow(tmp_path, [task("a", ["a"]), task("b", ["broken"], ["a"])])
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    base = ["--set", f"paths.runs_root={tmp_path}/runs", "--set", "spark.master=local[1]"]
    res = subprocess.run([sys.executable, "-m", "pipelines.cli", "workflow", "run", str(f), *base],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert res.returncode == 1
    assert "task 'b' failed" in res.stderr and "b.attempt1.log" in res.stderr
    assert json.loads(res.stdout.strip().splitlines()[-1])["status"] == "FAILED"
    listed = subprocess.run([sys.executable, "-m", "pipelines.cli", "workflow", "runs", *base],
                            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
    assert "toy" in listed.stdout and "FAILED" in listed.stdout


def start_until_slow_task_runs(tmp_path: Path, action: str, workflow: Path) -> subprocess.Popen:
    """`sparkvision workflow ACTION WORKFLOW` in the background, returned once its "slow" task has started."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "workflow", action, str(workflow),
                             "--set", f"paths.runs_root={tmp_path}/runs"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    deadline = time.monotonic() + 60
    while not (tmp_path / "slow.count").exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    return proc


@pytest.mark.slow
def test_scheduler_fires_never_overlaps_and_stops_on_sigterm(tmp_path):
    (tmp_path / "task.py").write_text(TASK)
    f = tmp_path / "wf.yaml"
    f.write_text(yaml.safe_dump({"resources": {"jobs": {"tick": {
        "name": "tick", "schedule": {"quartz_cron_expression": "*/2 * * * * ?", "timezone_id": "UTC"},
        "tasks": [task("slow", ["slow"])]}}}}))
    proc = start_until_slow_task_runs(tmp_path, "schedule", f)
    time.sleep(5)  # several fire times pass while the first run is still going: no second run starts
    assert (tmp_path / "slow.count").read_text() == "1"
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "next fire times:" in err and "scheduler stopped after 1 run(s)" in err
    records = list((tmp_path / "runs" / "workflows" / "tick").glob("*/record.json"))
    assert len(records) == 1
    record = json.loads(records[0].read_text())
    assert record["trigger"] == "schedule" and record["status"] == "CANCELLED"


@pytest.mark.slow
def test_workflow_run_stopped_by_sigterm_stops_the_task_and_records_the_run_cancelled(tmp_path):
    f = toy_workflow(tmp_path, [task("slow", ["slow"]), task("after", ["after"], ["slow"])])
    proc = start_until_slow_task_runs(tmp_path, "run", f)
    task_running = ["pgrep", "-f", str((tmp_path / "task.py").resolve())]
    assert subprocess.run(task_running, capture_output=True, text=True).stdout != ""
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM" in err
    record = json.loads(out.strip().splitlines()[-1])
    assert record["status"] == "CANCELLED" and record["tasks"]["slow"]["status"] == "CANCELLED"
    assert record["tasks"]["after"]["status"] == "CANCELLED"
    assert subprocess.run(task_running, capture_output=True, text=True).stdout == ""  # stopped, not left running


def condition(key, left, op, right, deps):
    return {"task_key": key, "depends_on": [{"task_key": d} for d in deps],
            "condition_task": {"left": left, "op": op, "right": right}}


def on(key, params, dep, outcome, **kw):
    return {"task_key": key, "depends_on": [{"task_key": dep, "outcome": outcome}],
            "spark_python_task": {"python_file": "task.py", "parameters": params}, **kw}


@pytest.mark.slow
def test_a_condition_runs_one_branch_skips_the_other_and_the_run_succeeds(tmp_path, cfg_factory):
    f = toy_workflow(tmp_path, [
        task("first", ["yes"]),
        condition("said_yes", "{{tasks.first.values.task}}", "EQUAL_TO", "yes", ["first"]),
        on("on_true", ["on_true"], "said_yes", "true"),
        on("on_false", ["on_false"], "said_yes", "false"),
        task("after_false", ["after_false"], ["on_false"]),
        task("cleanup", ["cleanup"], ["on_true", "on_false"], run_if="ALL_DONE"),
        task("alert", ["alert"], ["first"], run_if="AT_LEAST_ONE_FAILED"),
    ])
    record = WorkflowRunner(cfg_factory("spark.master=local[1]"), load_workflow(f), [], []).run()
    status = {k: v["status"] for k, v in record.tasks.items()}
    assert status == {"first": "SUCCESS", "said_yes": "SUCCESS", "on_true": "SUCCESS", "on_false": "EXCLUDED",
                      "after_false": "EXCLUDED", "cleanup": "SUCCESS", "alert": "EXCLUDED"}
    assert record.status == "SUCCESS"
    assert record.tasks["said_yes"]["outcome"] == "true"
    assert "other outcome" in record.tasks["on_false"]["reason"]
    assert not (tmp_path / "on_false.count").exists() and not (tmp_path / "alert.count").exists()  # never started


def test_run_if_follows_the_databricks_rules():
    ok, bad, skip = "SUCCESS", "FAILED", "EXCLUDED"
    assert run_if_verdict("ALL_SUCCESS", {"a": ok, "b": ok}, True) is None
    assert run_if_verdict("ALL_SUCCESS", {"a": ok, "b": bad}, True)[0] == "UPSTREAM_FAILED"
    assert run_if_verdict("ALL_SUCCESS", {"a": ok, "b": skip}, True)[0] == "EXCLUDED"
    assert run_if_verdict("AT_LEAST_ONE_SUCCESS", {"a": ok, "b": bad}, True) is None
    assert run_if_verdict("NONE_FAILED", {"a": ok, "b": skip}, True) is None
    assert run_if_verdict("NONE_FAILED", {"a": bad, "b": ok}, True)[0] == "UPSTREAM_FAILED"
    assert run_if_verdict("ALL_DONE", {"a": bad, "b": skip}, True) is None
    assert run_if_verdict("AT_LEAST_ONE_FAILED", {"a": ok, "b": "TIMEDOUT"}, True) is None
    assert run_if_verdict("ALL_FAILED", {"a": ok, "b": bad}, True)[0] == "EXCLUDED"
    assert run_if_verdict("ALL_DONE", {"a": ok}, False)[0] == "EXCLUDED"  # a condition's other outcome wins


def test_conditions_compare_strings_or_numbers_as_databricks_does():
    assert condition_outcome("champion", "EQUAL_TO", "champion")
    assert condition_outcome("0.93", "GREATER_THAN_OR_EQUAL", "0.9")
    assert not condition_outcome("10", "LESS_THAN", "9")
    assert condition_outcome("true", "NOT_EQUAL", "false")
    with pytest.raises(ValueError, match="GREATER_THAN needs numbers"):
        condition_outcome("abc", "GREATER_THAN", "1")


def test_an_outcome_asked_of_a_task_that_is_not_a_condition_is_refused(tmp_path):
    f = toy_workflow(tmp_path, [task("first", ["x"]), on("second", ["y"], "first", "true")])
    with pytest.raises(ConfigError, match="asks for an outcome of 'first', which is not a condition_task"):
        load_workflow(f)


def test_a_running_tasks_stage_lines_and_its_error_line_are_shown(tmp_path, capsys):
    from pipelines.workflow.runner import StageEcho

    log = tmp_path / "train.attempt1.log"
    log.write_text("$ spark-submit ...\n24/12/01 INFO noise\n[tune] trial 0 finished: 0.81\n[train] epoch 1/3: loss 0.7\n"
                   "error: training lost a Horovod worker: worker rank 1 was killed by SIGKILL\n[train] half a li")
    StageEcho(log).poll()
    assert capsys.readouterr().err.splitlines() == [
        "  [tune] trial 0 finished: 0.81", "  [train] epoch 1/3: loss 0.7",
        "  error: training lost a Horovod worker: worker rank 1 was killed by SIGKILL"]


def test_a_tasks_conf_files_keep_the_order_they_were_given_in(cfg_factory):
    """`workflow run --conf A --conf B`: every task merges A then B, so B's settings win, as on the command line."""
    wf = load_workflow(ROOT / "jobs/workflows/fashion_mnist.yaml")
    runner = WorkflowRunner(cfg_factory(), wf, ["conf/local.yaml", "conf/profiles/photos.yaml"], [])
    command = runner.command(wf.tasks["train"], {"ingest": {"dataset": "photos/v0001"}})
    confs = [command[i + 1] for i, arg in enumerate(command) if arg == "--conf" and command[i + 1].endswith(".yaml")]
    assert confs == ["conf/local.yaml", "conf/profiles/photos.yaml"]


def test_a_spark_tasks_driver_jvm_gets_the_configured_options_beside_quiet_logging(cfg_factory):
    """spark-submit starts the driver's JVM before the job's code reads its config: the runner passes
    spark.driver_java_options there, with the quiet-logging option after it (and without it under --verbose)."""
    wf = load_workflow(ROOT / "jobs/workflows/fashion_mnist.yaml")
    cfg = cfg_factory("spark.driver_java_options=-XX:TieredStopAtLevel=1")
    for verbose in (False, True):
        command = WorkflowRunner(cfg, wf, [], [], verbose=verbose).command(wf.tasks["ingest"], {})
        options = command[command.index("--driver-java-options") + 1].split()
        assert options[0] == "-XX:TieredStopAtLevel=1"
        assert [o.startswith("-Dlog4j.configurationFile=") for o in options[1:]] == ([] if verbose else [True])
