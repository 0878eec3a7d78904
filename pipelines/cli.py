"""The `sparkvision` command. Each job subcommand calls the same function as its jobs/*.py entry point."""
from __future__ import annotations

import argparse
import importlib
import sys
import traceback
from typing import Callable

from pipelines.config import Config, ConfigError, load_config
from pipelines.console import emit_result, quiet_libraries
from pipelines.environment import is_verbose
from pipelines.errors import PipelineError, first_line
from pipelines.signals import Stopped, stop_on_signals, stop_requested
from pipelines.secrets import redact, redacted_dict

# Job name -> "module:function(spark, cfg, **options) -> dict". Imported only when run.
JOBS = {
    "ingest": "pipelines.ingest.job:run_ingest",
    "train": "pipelines.train.job:run_train",
    "evaluate": "pipelines.inference.evaluate:run_evaluate",
    "infer": "pipelines.inference.job:run_infer",
    "tune": "pipelines.tune.study:run_tune",
    "experiment": "pipelines.tune.experiment:run_experiment",
}


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--conf", action="append", default=[], metavar="FILE",
                   help="config overlay merged over conf/base.yaml (repeatable, later wins)")
    p.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE",
                   help="override one config value, e.g. --set train.epochs=3 (repeatable)")
    p.add_argument("--verbose", action="store_true", help="show library logs and full tracebacks")
    p.add_argument("--print-config", action="store_true", help="print the effective config and exit")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparkvision", description=(
        "Train and serve image classifiers on Spark: ingest -> Horovod training -> MLflow -> batch inference."))
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    helps = {"ingest": "raw images -> validated, versioned Parquet dataset",
             "train": "Horovod-distributed Keras training, tracked in MLflow",
             "evaluate": "score a model on the test split; the promotion gate",
             "infer": "distributed batch inference over a DataFrame",
             "tune": "hyper-parameter search: an Optuna study whose trials run as Spark tasks",
             "experiment": "one of the training FAQ's experiments: variants x seeds at one budget"}
    for name, text in helps.items():
        p = sub.add_parser(name, help=text, description=text)
        _common(p)
        if name == "train":
            p.add_argument("--resume", metavar="RUN_ID", help="continue a run from its last completed epoch")
        if name == "experiment":
            p.add_argument("name", nargs="?", help="an experiment of conf/experiments/ (see --list), or a YAML file")
            p.add_argument("--list", action="store_true", help="list the experiments and exit")
    wf = sub.add_parser("workflow", help="run or schedule Databricks-format multi-task workflows")
    wf_sub = wf.add_subparsers(dest="action", metavar="ACTION", required=True)
    for action, text in {"run": "run a workflow's tasks locally in dependency order",
                         "schedule": "fire a workflow on its Quartz cron schedule",
                         "runs": "list recorded workflow runs"}.items():
        p = wf_sub.add_parser(action, help=text, description=text)
        if action != "runs":
            p.add_argument("file", help="workflow definition (Databricks Jobs YAML)")
        if action == "run":
            p.add_argument("--from", dest="from_task", metavar="TASK", help="repair: rerun from TASK on the last run")
        if action == "schedule":
            p.add_argument("--max-runs", type=int, default=0, help="stop after N runs (0: run until stopped)")
        _common(p)
    cl = sub.add_parser("cluster", help="start/stop a local Spark standalone cluster and MLflow server")
    cl.add_argument("action", choices=["up", "down", "status"])
    cl.add_argument("--workers", type=int, default=None, help="number of Spark workers (default: cluster.workers)")
    _common(cl)
    serve = sub.add_parser("serve", help="serve a registered model over REST (MLflow's scoring server)")
    serve.add_argument("--model", metavar="URI", help="default: infer.model_uri, else models:/<registered>@champion")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=5001)
    _common(serve)
    ui = sub.add_parser("ui", help="start the MLflow UI on the configured store (127.0.0.1)")
    ui.add_argument("--port", type=int, default=5000)
    _common(ui)
    return parser


def _load(path: str) -> Callable:
    module, func = path.split(":")
    return getattr(importlib.import_module(module), func)


def _run_job(name: str, cfg: Config, args: argparse.Namespace) -> int:
    target = JOBS[name]
    if target is None:
        print(f"sparkvision {name}: not built yet", file=sys.stderr)
        return 3
    job = _load(target)
    from pipelines.spark import get_spark, wind_down_on_stop

    if name == "experiment":
        from pipelines.tune.experiment import experiment_options

        options = experiment_options(args.name, args.list, args.overrides)
        if options is None:  # --list printed them
            return 0
    else:
        options = {"resume": args.resume} if name == "train" else {}
    spark = get_spark(cfg)
    with wind_down_on_stop(spark):
        result = job(spark, cfg, **options)
    emit_result(result)
    return 0


def _run_other(args: argparse.Namespace, cfg: Config) -> int:
    if args.command == "ui":
        return _load("pipelines.mlflow_ui:run_ui")(cfg, args.port)
    if args.command == "serve":
        return _load("pipelines.inference.serve:serve_model")(cfg, args.model, args.host, args.port, args.verbose)
    if args.command == "workflow":
        return _load("pipelines.workflow.cli:workflow_command")(args, cfg)
    if args.command == "cluster":
        return _load("pipelines.workflow.cluster:cluster_command")(args, cfg)
    raise AssertionError(args.command)


def _stopped(exc: Stopped) -> int:
    print(redact(str(exc)), file=sys.stderr)
    return exc.exit_code


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_libraries(args.verbose)
    with stop_on_signals():  # SIGTERM/SIGINT unwind the job: its MLflow run ends KILLED, exit 128 + the signal
        return _run_command(args)


def _run_command(args: argparse.Namespace) -> int:
    """Run the parsed command; every way it can end is one line on stderr and an exit code."""
    try:
        cfg = load_config(args.conf, args.overrides)
        if args.print_config:
            from pipelines.tracking import dump_yaml

            print(f"# merged from: {', '.join(cfg.sources)}" + (" and --set" if args.overrides else ""))
            print(dump_yaml(redacted_dict(cfg.to_dict())), end="")
            return 0
        if args.command in JOBS:
            return _run_job(args.command, cfg, args)
        return _run_other(args, cfg)
    except ConfigError as exc:
        print(redact(f"config error: {exc}"), file=sys.stderr)
        return 2
    except PipelineError as exc:
        if stop_requested():
            return _stopped(Stopped(stop_requested()))
        if is_verbose():
            traceback.print_exc()
        print(redact(f"error: {exc}"), file=sys.stderr)
        return 1
    except Stopped as exc:
        return _stopped(exc)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # anything unexpected: one line by default, the traceback with --verbose
        if stop_requested():  # what a JVM killed along with this process raises on the way out
            return _stopped(Stopped(stop_requested()))
        if is_verbose():
            traceback.print_exc()
        print(redact(f"error: {type(exc).__name__}: {first_line(exc)} (rerun with --verbose for the traceback)"),
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
