"""Secrets that must never appear in a log, a report, a manifest, a compiled pipeline or an
error: the values of the credential variables of the environment.

kubetune never writes them anywhere on purpose (rendered jobs reference Kubernetes Secrets by
name; workers inherit the environment). `redact` is the last guard on text that leaves the
process through a path that could carry someone else's words: error messages (a server's
answer, an exception's text) and the logs that `run --local` keeps.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

SECRET_VARIABLES = (
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "KFP_TOKEN",
    "WANDB_API_KEY",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
)
MASK = "***"
MIN_SECRET_LENGTH = 6  # shorter values would mask ordinary words


def secret_values(env: Mapping[str, str] | None = None) -> list[str]:
    """The secret values set in `env` (default: this process's environment), longest first."""
    where: Mapping[str, str] = os.environ if env is None else env
    values = {where[k] for k in SECRET_VARIABLES if len(where.get(k, "")) >= MIN_SECRET_LENGTH}
    return sorted(values, key=len, reverse=True)


def redact(text: str, env: Mapping[str, str] | None = None) -> str:
    """`text` with every secret value of the environment replaced by ***."""
    for value in secret_values(env):
        text = text.replace(value, MASK)
    return text
