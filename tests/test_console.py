"""The console: quiet mode when libraries log, and the one line a step prints."""
import subprocess
import sys
import time
from pathlib import Path

from pipelines.console import step

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import logging, sys
from pipelines.console import quiet_libraries
quiet_libraries({verbose})
import py4j.java_gateway  # the stand-in below: logs a failed call on the root logger, as py4j does
logging.getLogger("py4j.clientserver").error("a dying JVM refused a call")
logging.exception("not from py4j")
"""


def _stderr(tmp_path: Path, verbose: bool) -> str:
    fake = tmp_path / "site" / "py4j"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "java_gateway.py").write_text("import logging\nlogging.exception('Exception while sending command.')\n")
    env_path = f"{tmp_path / 'site'}:{ROOT}"
    out = subprocess.run([sys.executable, "-c", SCRIPT.format(verbose=verbose)], capture_output=True, text=True,
                         cwd=ROOT, env={"PYTHONPATH": env_path, "PATH": "/usr/bin:/bin"}, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stderr


def test_quiet_mode_drops_py4j_records_on_the_root_logger_and_keeps_the_rest(tmp_path):
    err = _stderr(tmp_path, verbose=False)
    assert "Exception while sending command" not in err and "dying JVM" not in err
    assert "ERROR:root:not from py4j" in err


def test_verbose_mode_shows_py4j_records(tmp_path):
    err = _stderr(tmp_path, verbose=True)
    assert "Exception while sending command" in err and "dying JVM" in err


def test_a_step_prints_its_line_and_leaves_its_seconds_in_the_dict_it_yielded(capsys):
    with step("ingest", "waiting") as info:
        info["note"] = "a note"
        time.sleep(0.2)
        assert "seconds" not in info
    assert 0.2 <= info["seconds"] < 5
    assert capsys.readouterr().err == f"[ingest] waiting: a note ({info['seconds']:.1f}s)\n"
