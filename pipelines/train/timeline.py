"""Horovod's timeline (train.horovod_timeline) read into a per-step breakdown: how long a training step takes, how
much of it a gradient allreduce runs, and how long the step stands still waiting on Horovod after its last gradient.

Horovod writes the timeline on rank 0 only, in Chrome's trace format (open it in chrome://tracing or Perfetto):
one track per tensor; each collective is a NEGOTIATE_* span (from the tensor being ready on rank 0 until every
worker has it ready) followed by the operation's span (ALLREDUCE, with GLOO_ALLREDUCE and the fusion buffer copies
inside it). Every gradient is allreduced once per step, so the tensors allreduced most often are the gradients and
their n-th allreduces make up step n.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from statistics import median

TIMELINE_FILE = "horovod_timeline.json"  # in the run's checkpoint folder; an MLflow artifact after the run


Collective = dict[str, tuple[int, int]]  # one collective of one tensor on rank 0: span name -> (begin, end), in µs


@dataclass(frozen=True)
class StepBreakdown:
    """Medians over the run's training steps, in milliseconds, seen from rank 0. `tail_ms` runs from rank 0's last
    gradient being ready to the step's last allreduce ending: the step waits on the other workers, Horovod's
    negotiation cycle and the allreduce itself."""
    steps: int           # gradient allreduce rounds found: one per training step
    step_ms: float       # from one step's first gradient being ready to the next step's
    allreduce_ms: float  # time within a step during which a gradient allreduce ran (the Gloo ring and its copies)
    tail_ms: float

    @property
    def compute_ms(self) -> float:
        """The rest of the step: forward and backward pass, input, optimizer update (with whatever CPU the
        allreduces running beside them take)."""
        return self.step_ms - self.tail_ms


def read_events(path: Path) -> list[dict]:
    """The trace's events. Horovod leaves the JSON array open (it appends while training) and a killed run may end
    mid-event: both are read up to the last whole event."""
    text = path.read_text().rstrip().rstrip(",")
    try:
        return json.loads(text if text.endswith("]") else text + "]")
    except json.JSONDecodeError:
        return json.loads(text[: text.rfind("}") + 1].rstrip().rstrip(",") + "]")


def collectives(events: list[dict]) -> dict[int, list[Collective]]:
    """Track (tensor) -> its collectives in order, each with its top-level and nested spans."""
    open_spans: dict[int, list[tuple[str, int]]] = {}
    out: dict[int, list[Collective]] = {}
    for e in events:
        track, phase = e.get("pid"), e.get("ph")
        if phase == "B":
            if e["name"].startswith("NEGOTIATE"):
                out.setdefault(track, []).append({})
            open_spans.setdefault(track, []).append((e["name"], e["ts"]))
        elif phase == "E" and open_spans.get(track) and out.get(track):
            name, begin = open_spans[track].pop()
            out[track][-1][name] = (begin, e["ts"])
    return out


def covered(spans: list[tuple[int, int]]) -> int:
    """Microseconds covered by any of `spans` (overlaps counted once)."""
    total, end = 0, None
    for b, e in sorted(spans):
        if end is None or b > end:
            total, end = total + e - b, e
        elif e > end:
            total, end = total + e - end, e
    return total


def breakdown(events: list[dict]) -> StepBreakdown | None:
    """Per-step medians from a timeline's events; None without at least two rounds of gradient allreduces (one
    worker has none)."""
    tracks = {t: c for t, c in collectives(events).items()
              if c and all("NEGOTIATE_ALLREDUCE" in x and "ALLREDUCE" in x for x in c)}
    steps = max((len(c) for c in tracks.values()), default=0)
    if steps < 2:  # a step's time needs two rounds
        return None
    rounds = [[c[k] for c in tracks.values() if len(c) == steps] for k in range(steps)]
    starts = [min(x["NEGOTIATE_ALLREDUCE"][0] for x in r) for r in rounds]
    ready = [max(x["NEGOTIATE_ALLREDUCE"][0] for x in r) for r in rounds]
    ends = [max(x["ALLREDUCE"][1] for x in r) for r in rounds]
    running = [covered([x["ALLREDUCE"] for x in r]) for r in rounds]
    return StepBreakdown(steps=steps, step_ms=_median_ms([b - a for a, b in zip(starts, starts[1:])]),
                         allreduce_ms=_median_ms(running), tail_ms=_median_ms([e - r for r, e in zip(ready, ends)]))


def _median_ms(microseconds: list[int]) -> float:
    return round(median(microseconds) / 1000, 2)


def describe(b: StepBreakdown) -> str:
    """One line for the console."""
    return (f"Horovod timeline, {b.steps} steps (medians, rank 0): a step {b.step_ms:.1f} ms, a gradient allreduce "
            f"running for {b.allreduce_ms:.1f} ms of it; after its last gradient the step waited {b.tail_ms:.1f} ms "
            f"on the other workers and the allreduce")
