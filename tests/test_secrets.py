"""Secrets never show: URI passwords, credential keys and the environment's tokens are redacted."""
import subprocess
import sys

import mlflow
import pytest
import yaml

from pipelines import tracking
from pipelines.secrets import REDACTED, redact, redacted_dict


def test_uri_passwords_credential_assignments_and_environment_tokens_are_redacted(monkeypatch):
    monkeypatch.setenv("DATABRICKS_TOKEN", "dapi0123456789abcdef")
    text = ("store postgresql://bob:hunter22@db:5432/mlflow, server https://alice:tok-99@mlflow.example/ "
            "--set spark.hadoop.fs.s3a.secret.key=AKIAXYZ header Bearer dapi0123456789abcdef")
    out = redact(text)
    for secret in ("hunter22", "tok-99", "AKIAXYZ", "dapi0123456789abcdef"):
        assert secret not in out
    assert "postgresql://bob:***@db:5432/mlflow" in out and "https://alice:***@mlflow.example/" in out
    # what is not a secret stays as it was
    plain = "sqlite:////tmp/mlflow.db file:///data/train s3a://bucket/photos http://127.0.0.1:5000 epochs=3"
    assert redact(plain) == plain


def test_a_config_mapping_hides_secret_keys_and_secrets_inside_values():
    data = {"mlflow": {"tracking_uri": "mysql://u:pw1234@h/db", "registered_model": "m"},
            "spark": {"extra_conf": {"spark.hadoop.fs.s3a.secret.key": "S3CRET", "spark.executor.cores": "2"}},
            "cluster": {"mlflow_auth": True}, "train": {"epochs": 3}}
    out = redacted_dict(data)
    assert out["mlflow"]["tracking_uri"] == f"mysql://u:{REDACTED}@h/db"
    assert out["spark"]["extra_conf"] == {"spark.hadoop.fs.s3a.secret.key": REDACTED, "spark.executor.cores": "2"}
    assert out["cluster"]["mlflow_auth"] is True and out["train"]["epochs"] == 3
    assert out["mlflow"]["registered_model"] == "m"
    assert data["mlflow"]["tracking_uri"] == "mysql://u:pw1234@h/db"  # a copy: the config itself is untouched


@pytest.mark.fault('a password in mlflow.tracking_uri, --print-config', kind='security', shows='shown as `***`')
def test_print_config_shows_no_password():
    out = subprocess.run([sys.executable, "-m", "pipelines.cli", "ingest", "--print-config",
                          "--set", "mlflow.tracking_uri=postgresql://bob:hunter22@db/mlflow"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "hunter22" not in out.stdout and "postgresql://bob:***@db/mlflow" in out.stdout


@pytest.mark.fault('credentials in the config and the environment, MLflow params and config.yaml', kind='security',
                   shows='shown as `***`')
def test_mlflow_params_and_the_config_artifact_hold_no_secret(cfg_factory, monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "pa55word-xyz")
    cfg = cfg_factory('spark.extra_conf={"spark.hadoop.fs.s3a.access.key": "AKIAKEY", "spark.ui.port": "4050"}',
                      "ingest.source.path=/mnt/pa55word-xyz/photos")
    tracking.configure(cfg)
    with mlflow.start_run() as run:
        tracking.log_config(cfg, ("spark", "ingest"))
    got = mlflow.get_run(run.info.run_id).data.params
    assert got["spark.extra_conf.spark.hadoop.fs.s3a.access.key"] == REDACTED
    assert got["spark.extra_conf.spark.ui.port"] == "4050"
    assert got["ingest.source.path"] == f"/mnt/{REDACTED}/photos"
    artifact = yaml.safe_load(open(mlflow.artifacts.download_artifacts(run_id=run.info.run_id,
                                                                       artifact_path="config.yaml",
                                                                       dst_path=str(tmp_path))))
    text = yaml.safe_dump(artifact)
    assert "AKIAKEY" not in text and "pa55word-xyz" not in text
