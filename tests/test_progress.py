"""Progress lines: rewritten in place on a terminal, a line every so often in a log, nothing for short work."""
import io
import time

from pipelines.progress import ProgressLine, progress_text, spark_task_progress


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_text_says_done_of_total_rate_and_time_left():
    assert progress_text("epoch 3/8", 120, 450, 30.0, "steps") == \
        "epoch 3/8: 120/450 steps (27%), 4.0 steps/s, 1m23s left"
    assert progress_text("decoding", 4, 4, 2.0, "tasks") == "decoding: 4/4 tasks (100%), 2.0 tasks/s"


def test_on_a_terminal_one_line_is_rewritten_and_cleared():
    term = Terminal()
    line = ProgressLine("train", after=0, stream=term)
    line.update("a")
    line.update("b")
    line.clear()
    assert term.getvalue() == "\r\x1b[K[train] a\r\x1b[K[train] b\r\x1b[K"


def test_in_a_log_a_line_every_log_every_seconds_and_nothing_for_short_work(capsys):
    log = io.StringIO()
    quiet = ProgressLine("train", after=60, stream=log)
    quiet.update("short")
    assert log.getvalue() == "" and capsys.readouterr().err == ""
    line = ProgressLine("train", after=0, log_every=0.2, stream=log)
    line.update("first")  # too soon after the start
    time.sleep(0.25)
    line.update("second")
    line.update("third")  # too soon after the last
    assert capsys.readouterr().err == "[train] second\n" and log.getvalue() == ""


def test_spark_tasks_are_counted_from_the_status_tracker(spark, capsys):
    with spark_task_progress(spark, "ingest", "decoding", poll_seconds=0.2, after=0, log_every=0):
        spark.sparkContext.parallelize(range(4), 4).foreach(lambda _: time.sleep(1.5))
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("[ingest] decoding: ")]
    assert lines and all("/4 tasks (" in x for x in lines)
