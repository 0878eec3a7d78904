"""Secrets never show: a password in a URI (`postgresql://user:PASSWORD@host/db`, `https://user:TOKEN@host`), a
config key that names a secret, and the values of the environment's credential variables are redacted wherever
the project prints or records text (the terminal, --print-config, MLflow params and config artifacts, workflow run
records and task logs)."""
from __future__ import annotations

import os
import re
from typing import Any

REDACTED = "***"
# the environment variables whose values are credentials (Databricks, MLflow, the clouds' object stores)
SECRET_ENV_VARS = ("DATABRICKS_TOKEN", "DATABRICKS_PASSWORD", "DATABRICKS_CLIENT_SECRET", "MLFLOW_TRACKING_PASSWORD",
                   "MLFLOW_TRACKING_TOKEN", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AZURE_CLIENT_SECRET",
                   "AZURE_STORAGE_KEY", "GOOGLE_API_KEY", "HF_TOKEN")
_SECRET_KEY = re.compile(r"(password|passwd|secret|token|credential|api[_.-]?key|access[_.-]?key|private[_.-]?key)",
                         re.IGNORECASE)
_URI_PASSWORD = re.compile(r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.-]*://[^/\s:@]+:)(?P<password>[^@\s/]+)(?P<at>@)")
_ASSIGNMENT = re.compile(r"(?P<key>[\w.-]*(?:password|passwd|secret|token|api[_-]?key|access[_-]?key)[\w.-]*)"
                         r"(?P<eq>\s*[=:]\s*)(?P<value>[^\s,;'\"]+)", re.IGNORECASE)
_MIN_SECRET_LENGTH = 4  # shorter environment values would redact ordinary text


def is_secret_key(key: str) -> bool:
    """Whether a config key's value is a credential (`...password`, `...secret.key`, `...token`)."""
    return bool(_SECRET_KEY.search(key))


def redact(text: str) -> str:
    """`text` with URI passwords, `key=value` credentials and the environment's credential values replaced."""
    text = _URI_PASSWORD.sub(lambda m: f"{m['head']}{REDACTED}{m['at']}", text)
    text = _ASSIGNMENT.sub(lambda m: f"{m['key']}{m['eq']}{REDACTED}", text)
    for name in SECRET_ENV_VARS:
        value = os.environ.get(name, "")
        if len(value) >= _MIN_SECRET_LENGTH:
            text = text.replace(value, REDACTED)
    return text


def redact_value(key: str, value: Any) -> Any:
    """A config value as it may be shown: a secret key's value hidden, a string's embedded secrets redacted."""
    if isinstance(value, dict):
        return {k: redact_value(str(k), v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact_value(key, v) for v in value]
    if value is not None and not isinstance(value, bool) and is_secret_key(key):
        return REDACTED
    return redact(value) if isinstance(value, str) else value


def redacted_dict(data: dict[str, Any]) -> dict[str, Any]:
    """A nested config mapping, every secret in it redacted (a copy)."""
    return redact_value("", data)
