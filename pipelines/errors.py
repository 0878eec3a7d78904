"""Errors the user can act on: the CLI prints them as one sentence, no traceback unless --verbose."""


class PipelineError(RuntimeError):
    """Bad input or state (missing dataset, empty input, wrong shape): exit code 1, one clear line."""


def first_line(exc: BaseException) -> str:
    """An exception's message cut to its first line, for one-line errors; empty when it has no message."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else ""
