"""Errors the user can act on: the CLI prints them as one sentence, no traceback unless --verbose."""


class PipelineError(RuntimeError):
    """Bad input or state (missing dataset, empty input, wrong shape): exit code 1, one clear line."""
