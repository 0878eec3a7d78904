"""Errors the user can act on: the CLI prints them as one sentence, no traceback unless --verbose."""


class PipelineError(RuntimeError):
    """Bad input or state (missing dataset, empty input, wrong shape): exit code 1, one clear line."""


def first_line(exc: BaseException) -> str:
    """An exception's message cut to its first line, for one-line errors; empty when it has no message.

    A Java error seen through py4j starts "An error occurred while calling o123.method." and says what happened on
    the next line ("org.apache.spark.SparkException: Job aborted due to stage failure: ..."): that line is kept."""
    lines = str(exc).strip().splitlines()
    if len(lines) > 1 and lines[0].startswith("An error occurred while calling ") and lines[1].startswith(": "):
        return lines[1][2:]
    return lines[0] if lines else ""


def root_cause(exc: BaseException) -> str:
    """The innermost cause of an error, as `Type: message`: for a Java error seen through py4j, the end of the Java
    cause chain (`java.io.IOException: No space left on device` under Spark's TASK_WRITE_FAILED)."""
    java = getattr(exc, "java_exception", None)
    if java is not None:
        try:
            while java.getCause() is not None:
                java = java.getCause()
            return str(java.toString())
        except Exception:
            pass
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return f"{type(exc).__name__}: {first_line(exc)}"
