"""Registering a pushed model in Kubeflow Model Registry (`output.model_registry`), with the
`model-registry` client: the registered model (created once), a version per run (named after
the run) whose properties are the base model and its commit, the method, the dataset
fingerprint, the evaluation metrics and the quality gate's verdict, and the model artifact (the
pushed URI, format `huggingface` as KServe's runtime reads it). The push calls this after every
object is uploaded and verified and before it writes manifest.json, which records the outcome.
"""

from __future__ import annotations

import logging

from ..config import RegistryConfig
from ..errors import UserError

FORMAT, FORMAT_VERSION = "huggingface", "1"  # KServe's modelFormat for the runtime that serves it


def version_properties(manifest: dict) -> dict[str, str | float | bool]:
    """What a version records: flat scalars (the registry's custom properties)."""
    base = manifest.get("base_model") or {}
    props: dict[str, str | float | bool] = {
        "base_model": base.get("name_or_path") or "",
        "base_model_commit": base.get("commit") or "",
        "method": manifest.get("method") or "",
        "dataset_fingerprint": manifest.get("dataset_fingerprint") or "",
        "kubetune_version": manifest.get("kubetune_version", ""),
    }
    evaluation = (manifest.get("metrics") or {}).get("evaluation") or {}
    for side in ("tuned", "baseline"):
        for key, value in (evaluation.get(side) or {}).items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                props[f"{side}_{key}"] = float(value)
    for row in (evaluation.get("lm_eval") or {}).get("tasks", []):
        props[f"lm_eval_{row['task']}_base"] = float(row["base"])
        props[f"lm_eval_{row['task']}_tuned"] = float(row["tuned"])
    gate = evaluation.get("gate") or {}
    if "passed" in gate:
        props["gate_passed"] = bool(gate["passed"])
    return {k: v for k, v in props.items() if v != ""}


def check_new_version(config: RegistryConfig, version: str) -> None:
    """Refuse, before anything is uploaded, a version the registered model already has (the
    registration, after the upload, would refuse it). A registry that does not answer now is
    left to the registration, whose outcome manifest.json records."""
    from model_registry import ModelRegistry

    try:
        client = ModelRegistry(config.server, author=config.author, log_level=logging.ERROR)
        taken = (
            client.get_registered_model(config.model_name) is not None
            and client.get_model_version(config.model_name, version) is not None
        )
    except Exception:  # down or refusing now: the registration after the upload says so
        return
    if taken:
        raise UserError(
            f"the Model Registry at {config.server}: model {config.model_name} already has a "
            f"version {version}; a run registers its model once (nothing was pushed)"
        )


def register(config: RegistryConfig, uri: str, version: str, manifest: dict) -> dict:
    """Register `uri` as `version` of config.model_name; the record manifest.json keeps."""
    from model_registry import ModelRegistry

    where = f"the Model Registry at {config.server}"
    try:
        client = ModelRegistry(config.server, author=config.author, log_level=logging.ERROR)
        known = client.get_registered_model(config.model_name) is not None
        if known and client.get_model_version(config.model_name, version) is not None:
            raise UserError(
                f"{where}: model {config.model_name} already has a version {version}; a run "
                "registers its model once"
            )
        model = client.register_model(
            config.model_name,
            uri,
            model_format_name=FORMAT,
            model_format_version=FORMAT_VERSION,
            version=version,
            version_description=f"kubetune run {version}: {manifest.get('method')} of "
            f"{(manifest.get('base_model') or {}).get('name_or_path')}",
            metadata=version_properties(manifest),
        )
        registered = client.get_model_version(config.model_name, version)
        artifact = client.get_model_artifact(config.model_name, version)
    except UserError:
        raise
    except Exception as exc:  # the client raises many kinds; name the registry and the cause
        raise UserError(f"{where}: {exc.__class__.__name__}: {str(exc).splitlines()[0]}") from None
    return {
        "registered": True,
        "server": config.server,
        "model": config.model_name,
        "model_id": model.id,
        "version": version,
        "version_id": registered.id if registered else None,
        "artifact_id": artifact.id if artifact else None,
    }
