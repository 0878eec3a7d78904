"""Quartz cron (Databricks' schedule format) on top of croniter, and a scheduler loop that never overlaps runs."""
from __future__ import annotations

import threading
from datetime import datetime
from typing import Callable, Iterator
from zoneinfo import ZoneInfo

from croniter import croniter

from pipelines.config import ConfigError
from pipelines.signals import call_on_signals, signal_name

_QUARTZ_DOW = {"1": "0", "2": "1", "3": "2", "4": "3", "5": "4", "6": "5", "7": "6"}


def quartz_to_cron(expr: str) -> str:
    """Quartz `sec min hour dom month dow [year]` -> croniter's `min hour dom month dow sec`.

    Quartz numbers weekdays 1-7 from Sunday (cron: 0-6) and uses `?` for "no specific value".
    """
    fields = expr.split()
    if len(fields) not in (6, 7):
        raise ConfigError(f"quartz_cron_expression {expr!r}: expected 6 or 7 fields (sec min hour dom month dow [year])")
    if len(fields) == 7 and fields[6] not in ("*", "?"):
        raise ConfigError(f"quartz_cron_expression {expr!r}: a year field other than * is not supported")
    sec, minute, hour, dom, month, dow = fields[:6]
    dom = "*" if dom == "?" else dom
    dow = "*" if dow == "?" else _translate_dow(dow)
    cron = f"{minute} {hour} {dom} {month} {dow} {sec}"
    if not croniter.is_valid(cron):
        raise ConfigError(f"quartz_cron_expression {expr!r} is not valid")
    return cron


def _translate_dow(dow: str) -> str:
    out, token = [], ""
    for ch in dow + "\0":
        if ch.isdigit():
            token += ch
            continue
        if token:
            out.append(_QUARTZ_DOW.get(token, token) if not (out and out[-1] == "#") else token)
            token = ""
        if ch != "\0":
            out.append(ch)
    return "".join(out)


def fire_times(expr: str, tz: str, start: datetime | None = None) -> Iterator[datetime]:
    """Upcoming fire times of a Quartz expression in its time zone."""
    zone = ZoneInfo(tz)
    it = croniter(quartz_to_cron(expr), start or datetime.now(zone))
    while True:
        yield it.get_next(datetime)


class Scheduler:
    """Fires `run_once` at each fire time; a run still going when the next time comes makes that time skipped,
    so runs never overlap. SIGTERM/SIGINT stop it cleanly (the run in flight is cancelled and recorded)."""

    def __init__(self, expr: str, tz: str, run_once: Callable[[], None], on_cancel: Callable[[], None],
                 say: Callable[[str], None], max_runs: int = 0):
        self.expr, self.tz, self.run_once, self.on_cancel, self.say = expr, tz, run_once, on_cancel, say
        self.max_runs = max_runs
        self.stop = threading.Event()

    def _stop_on(self, signum: int) -> None:
        self.say(f"received {signal_name(signum)}: stopping after cancelling the run in flight")
        self.stop.set()
        self.on_cancel()

    def serve(self) -> int:
        runs = 0
        with call_on_signals(self._stop_on):
            times = fire_times(self.expr, self.tz)
            upcoming = [next(times) for _ in range(3)]
            self.say("next fire times: " + ", ".join(t.isoformat() for t in upcoming))
            nxt = upcoming[0]
            while not self.stop.is_set():
                wait = (nxt - datetime.now(ZoneInfo(self.tz))).total_seconds()
                if wait > 0 and self.stop.wait(wait):
                    break
                self.say(f"firing at {nxt.isoformat()}")
                self.run_once()
                runs += 1
                if self.max_runs and runs >= self.max_runs:
                    break
                now = datetime.now(ZoneInfo(self.tz))
                nxt = next(fire_times(self.expr, self.tz, now))
                self.say(f"next fire time: {nxt.isoformat()}")
        self.say(f"scheduler stopped after {runs} run(s)")
        return 0
