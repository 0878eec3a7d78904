"""`sparkvision workflow run|schedule|runs`."""
from __future__ import annotations

import argparse

from pipelines.config import Config
from pipelines.console import emit_result, say
from pipelines.environment import is_verbose
from pipelines.signals import call_on_signals, signal_name
from pipelines.workflow.definition import load_workflow
from pipelines.workflow.runner import SUCCESS, WorkflowRunner, list_runs


def _summary(record) -> dict:
    return {"stage": "workflow", "run_id": record.run_id, "job": record.job, "status": record.status,
            "tasks": {k: {"status": v.get("status"), "attempts": len(v.get("attempts", [])), "log": v.get("log"),
                          "values": v.get("values", {}), **({"reason": v["reason"]} if v.get("reason") else {})}
                      for k, v in record.tasks.items()}}


def workflow_command(args: argparse.Namespace, cfg: Config) -> int:
    if args.action == "runs":
        for r in list_runs(cfg):
            tasks = ", ".join(f"{k}={v.get('status')}" for k, v in r.tasks.items())
            print(f"{r.run_id}  {r.job}  {r.status:<9} {r.trigger:<9} started {r.started}  ended {r.ended or '-'}  {tasks}")
        return 0
    wf = load_workflow(args.file)
    runner = WorkflowRunner(cfg, wf, args.conf, args.overrides, is_verbose())
    if args.action == "run":
        try:
            with call_on_signals(lambda _: runner.cancel()) as received:  # SIGTERM/Ctrl-C: stop the task in flight, keep the record
                record = runner.run(repair_from=args.from_task)
        except ValueError as exc:
            say("workflow", f"error: {exc}")
            return 2
        emit_result(_summary(record))
        if received:
            say("workflow", f"run {record.run_id} {record.status}: stopped by {signal_name(received[0])}")
            return 128 + received[0]
        if record.status != SUCCESS:
            bad = next((k for k, v in record.tasks.items() if v.get("status") not in (SUCCESS, "REUSED", "EXCLUDED")),
                       "?")
            say("workflow", f"run {record.run_id} {record.status}: task {bad!r} failed; log "
                            f"{record.tasks.get(bad, {}).get('log')}; repair with --from {bad}")
            return 1
        skipped = [k for k, v in record.tasks.items() if v.get("status") == "EXCLUDED"]
        say("workflow", f"run {record.run_id} SUCCESS" + (f" ({', '.join(skipped)} skipped)" if skipped else ""))
        return 0
    # schedule
    from pipelines.workflow.schedule import Scheduler

    if not wf.cron:
        say("workflow", f"{wf.path} has no schedule.quartz_cron_expression")
        return 2
    results = []

    def once() -> None:
        record = runner.run(trigger="schedule")
        results.append(record.status)
        say("workflow", f"scheduled run {record.run_id}: {record.status}")
        runner._cancel.clear()

    say("workflow", f"scheduling {wf.name} on '{wf.cron}' ({wf.timezone}); Ctrl-C or SIGTERM stops")
    code = Scheduler(wf.cron, wf.timezone, once, runner.cancel, lambda m: say("schedule", m),
                     max_runs=args.max_runs).serve()
    emit_result({"stage": "schedule", "runs": len(results), "statuses": results})
    return code

