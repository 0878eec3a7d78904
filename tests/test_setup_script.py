"""`make setup GPU=1` (scripts/setup.sh) stops with a clear message, before creating or downloading anything, when
there is no CUDA toolkit to build Horovod's NCCL operations with."""
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _setup(env_extra: dict[str, str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "GPU": "1", **env_extra}
    return subprocess.run(["bash", "scripts/setup.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("toolkit", ["missing", "nvcc_without_headers"])
def test_gpu_setup_without_a_cuda_toolkit_stops_first(tmp_path, toolkit):
    cuda = tmp_path / "cuda"
    if toolkit == "nvcc_without_headers":  # a folder with bin/nvcc but no include/cuda_runtime.h is no toolkit
        (cuda / "bin").mkdir(parents=True)
        (cuda / "bin" / "nvcc").write_text("#!/bin/sh\nexit 0\n")
        (cuda / "bin" / "nvcc").chmod(0o755)
    venv_before = sorted(p.name for p in (ROOT / ".venv").iterdir()) if (ROOT / ".venv").is_dir() else None

    res = _setup({"HOROVOD_CUDA_HOME": str(cuda)})

    assert res.returncode == 1, res.stdout + res.stderr
    assert f"HOROVOD_CUDA_HOME={cuda} has no bin/nvcc and include/cuda_runtime.h" in res.stderr
    # It stopped right after the Java check: no venv created, nothing installed or built.
    assert res.stdout.strip().splitlines() == ["[setup] java 17 ok"], res.stdout
    venv_after = sorted(p.name for p in (ROOT / ".venv").iterdir()) if (ROOT / ".venv").is_dir() else None
    assert venv_after == venv_before
