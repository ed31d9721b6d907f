"""manifest.json: what the model is (merged, adapter, full), where it came from, its metrics,
and every file with its size and SHA-256. Written last by a push; read first by a pull."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from .. import __version__
from ..artifacts import (
    MERGE_FILE,
    METRICS_FILE,
    RECIPE_FILE,
    TRAINING_METRICS_FILE,
    BaseModelRecord,
    model_folder,
    read_json,
)

if TYPE_CHECKING:
    from .files import LocalFile

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "kubetune.manifest/v1"


def _base_model(name_or_path: str | None, revision: str | None, commit: str | None) -> dict:
    """The manifest's base_model: name, requested revision, fetched commit (or digest)."""
    return {"name_or_path": name_or_path, "revision": revision, "commit": commit}


def describe_model(src: Path, evaluation: dict | None) -> dict:
    """Provenance of a model folder written by kubetune train or merge."""
    import yaml

    merge = read_json(src / MERGE_FILE)
    base = BaseModelRecord.read(src)
    recipe_file = src / RECIPE_FILE
    recipe = yaml.safe_load(recipe_file.read_text()) if recipe_file.is_file() else None
    folder = model_folder(src)
    kind = "adapter" if folder.is_adapter else folder.kind.value
    if merge is not None:
        base_model = _base_model(merge["base"], merge.get("revision"), merge.get("commit"))
        fingerprint = merge.get("dataset_fingerprint")
    elif base is not None:
        base_model = _base_model(base.name_or_path, base.revision, base.commit)
        fingerprint = base.dataset_fingerprint
    else:
        model = (recipe or {}).get("model", {})
        base_model = _base_model(
            model.get("name_or_path"), model.get("revision"), model.get("commit")
        )
        fingerprint = None
    training = read_json(src / TRAINING_METRICS_FILE) or (
        read_json(src / METRICS_FILE) if kind != "files" else None
    )
    if training is not None:
        history = training.pop("loss", None) or []
        training["final_loss"] = history[-1][1] if history else None
    return {
        "kind": kind,
        "base_model": base_model,
        "adapter": merge.get("adapter") if merge else None,
        "method": (recipe or {}).get("method"),
        "dataset_fingerprint": fingerprint,
        "recipe": recipe,
        "metrics": {"training": training, "evaluation": evaluation},
    }


def build_manifest(files: list[LocalFile], description: dict) -> dict:
    return {
        "format": MANIFEST_FORMAT,
        "kubetune_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **description,
        "total_bytes": sum(f.size for f in files),
        "files": [{"path": f.path, "size": f.size, "sha256": f.sha256} for f in files],
    }
