"""One-line error messages."""
from pipelines.errors import first_line


def test_first_line_of_an_exception_message_even_an_empty_one():
    assert first_line(ValueError("  bad value\nmore detail")) == "bad value"
    assert first_line(RuntimeError()) == ""  # str(exc).splitlines()[0] raised IndexError here


def test_a_java_error_through_py4j_keeps_the_line_that_says_what_happened():
    message = ("An error occurred while calling z:org.apache.spark.api.python.PythonRDD.collectAndServe.\n"
               ": org.apache.spark.SparkException: Job aborted due to stage failure: Task 1 in stage 0.0 failed 1 "
               "times, most recent failure: Lost task 1.0 in stage 0.0 (TID 1) (192.0.2.2 executor driver): "
               "org.apache.spark.SparkException: Python worker exited unexpectedly (crashed)\n"
               "\tat org.apache.spark.api.python.BasePythonRunner$ReaderIterator.read(PythonRunner.scala:612)")
    assert first_line(RuntimeError(message)) == (
        "org.apache.spark.SparkException: Job aborted due to stage failure: Task 1 in stage 0.0 failed 1 times, most "
        "recent failure: Lost task 1.0 in stage 0.0 (TID 1) (192.0.2.2 executor driver): "
        "org.apache.spark.SparkException: Python worker exited unexpectedly (crashed)")
