"""The wheel from setup.py (what `databricks.yml` deploys and `pip install` gives) carries conf/, and its CLI finds the
shipped overlays with no checkout around it."""
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_wheel_ships_conf_and_its_cli_runs_without_a_checkout(tmp_path):
    src = tmp_path / "src"  # build from a copy, so the build leaves nothing in the checkout
    shutil.copytree(ROOT / "pipelines", src / "pipelines", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "conf", src / "conf")
    for name in ("setup.py", "pyproject.toml", "constraints.txt", "README.md", "MANIFEST.in"):
        shutil.copy(ROOT / name, src / name)
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "--disable-pip-version-check", "-w", str(tmp_path / "dist"), str(src)],
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr
    (wheel,) = (tmp_path / "dist").glob("sparkvision-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"pipelines/conf/base.yaml", "pipelines/conf/local.yaml", "pipelines/conf/profiles/accurate.yaml",
            "pipelines/log4j2.properties"} <= names

    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}  # ahead of the checkout's editable install
    run = subprocess.run([sys.executable, "-m", "pipelines.cli", "train", "--conf", "conf/local.yaml",
                          "--conf", "conf/profiles/accurate.yaml", "--print-config"],
                         cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    printed = run.stdout
    packaged = site / "pipelines" / "conf"
    assert str(packaged / "base.yaml") in printed and str(packaged / "profiles/accurate.yaml") in printed
    assert str(ROOT) not in printed

    missing = subprocess.run([sys.executable, "-m", "pipelines.cli", "train", "--conf", "conf/nope.yaml"],
                             cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2
    assert "config file not found: conf/nope.yaml (shipped overlays: conf/cluster.yaml" in missing.stderr
