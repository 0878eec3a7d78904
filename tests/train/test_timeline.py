import json

import pytest

from pipelines.train.timeline import breakdown, covered, describe, read_events


def _trace(steps: list[list[tuple[int, int, int]]]) -> list[dict]:
    """A Horovod-style trace: two gradient tracks (pid 1, 2) and a metric track (pid 3, allreduced once). Each step:
    [(negotiate_begin, allreduce_begin, allreduce_end) per gradient track], microseconds."""
    events = [{"name": "process_name", "ph": "M", "pid": p, "args": {"name": n}}
              for p, n in ((1, "grads_0"), (2, "grads_1"), (3, "HorovodAllreduce"))]
    for tracks in steps:
        for pid, (neg, begin, end) in zip((1, 2), tracks):
            events += [{"ph": "B", "name": "NEGOTIATE_ALLREDUCE", "ts": neg, "pid": pid},
                       {"ph": "X", "name": "1", "ts": neg + 1, "pid": pid, "dur": 0},
                       {"ph": "E", "ts": begin, "pid": pid},
                       {"ph": "B", "name": "ALLREDUCE", "ts": begin, "pid": pid},
                       {"ph": "B", "name": "GLOO_ALLREDUCE", "ts": begin + 1, "pid": pid},
                       {"ph": "E", "ts": end - 1, "pid": pid},
                       {"ph": "E", "ts": end, "pid": pid}]
    events += [{"ph": "B", "name": "NEGOTIATE_ALLREDUCE", "ts": 0, "pid": 3}, {"ph": "E", "ts": 10, "pid": 3},
               {"ph": "B", "name": "ALLREDUCE", "ts": 10, "pid": 3}, {"ph": "E", "ts": 900_000, "pid": 3}]
    return events


# three steps of 50 ms: the first gradient ready at +20 ms, the second at +35 ms; allreduces 20-30 and 38-44 ms
STEPS = [[(t + 20_000, t + 22_000, t + 30_000), (t + 35_000, t + 38_000, t + 44_000)] for t in (0, 50_000, 100_000)]


def test_a_trace_breaks_down_into_step_allreduce_and_tail_time_per_step():
    b = breakdown(_trace(STEPS))
    assert b.steps == 3  # the metric allreduced once is not a step
    assert b.step_ms == 50.0
    assert b.allreduce_ms == 8.0 + 6.0  # the two allreduces do not overlap
    assert b.tail_ms == 44.0 - 35.0  # from the last gradient ready to the last allreduce's end
    assert b.compute_ms == 41.0
    assert "3 steps" in describe(b) and "50.0 ms" in describe(b)


def test_overlapping_allreduces_count_once():
    assert covered([(0, 10), (5, 12), (20, 25), (21, 22)]) == 12 + 5
    assert covered([]) == 0


def test_a_trace_without_gradient_allreduces_has_no_breakdown():
    metric_only = [e for e in _trace(STEPS) if e["pid"] == 3]
    assert breakdown(metric_only) is None


@pytest.mark.parametrize("ending", ["", ",\n", ',\n{"ph": "B", "name": "NEGOTIATE_ALL'])
def test_an_open_or_cut_off_trace_reads_up_to_its_last_whole_event(tmp_path, ending):
    events = _trace(STEPS)
    path = tmp_path / "timeline.json"
    # as Horovod writes it: an array it never closes, one event after another
    path.write_text("[\n" + ",\n".join(json.dumps(e) for e in events) + ending)
    assert read_events(path) == events
    assert breakdown(read_events(path)).steps == 3
