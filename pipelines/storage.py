"""Where a job will write, checked before it starts work: a folder that cannot be created or written to is one
clear error naming the config key, instead of a failure after minutes of decoding or training."""
from __future__ import annotations

import uuid
from pathlib import Path

from pipelines.errors import PipelineError


def check_writable(folder: str | Path, key: str) -> Path:
    """Create `folder` if needed and prove a file can be written in it; PipelineError naming `key` otherwise."""
    path = Path(folder).expanduser()
    probe = path / f".sparkvision-write-check-{uuid.uuid4().hex[:8]}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise PipelineError(f"cannot write to {key} {path}: {exc.strerror or exc}") from None
    return path

