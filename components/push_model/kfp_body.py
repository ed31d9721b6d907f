"""The push step inside a KFP pipeline (its component.py calls this), and the Markdown the
KFP UI shows for a pushed model."""

from __future__ import annotations

import json
from pathlib import Path

from ..artifacts import METRICS_FILE
from ..config import RunConfig, parse_recipe


def push(recipe_yaml: str, model_dir: str, eval_dir: str, summary_path: str | None = None) -> str:
    from .step import push as run_push
    from .upload import Encryption

    cfg = parse_recipe(recipe_yaml, "recipe")
    evaluation = json.loads((Path(eval_dir) / METRICS_FILE).read_text())
    # the version is named after the run: RUN_DIR is WORKSPACE/runs/RUN_ID/...
    run_id = next((p.name for p in Path(model_dir).parents if p.parent.name == "runs"), None)
    run_push(
        model_dir,
        cfg.output.uri,
        evaluation=evaluation,
        register=registrar(cfg, run_id or Path(model_dir).name),
        encryption=Encryption(cfg.output.sse, cfg.output.sse_kms_key_id),
    )
    if summary_path:
        Path(summary_path).write_text(pushed_summary(cfg.output.uri, Path(model_dir)))
    return cfg.output.uri.rstrip("/") + "/manifest.json"


def registrar(cfg: RunConfig, version: str):
    """The push's `register` hook for the recipe's output.model_registry (None without one),
    once the registry has said that `version` is a new one."""
    if cfg.output.model_registry is None:
        return None
    from .registry import check_new_version, register

    check_new_version(cfg.output.model_registry, version)

    return lambda manifest: register(
        cfg.output.model_registry, cfg.output.uri.rstrip("/"), version, manifest
    )


def pushed_summary(uri: str, model_dir: Path) -> str:
    """The KFP UI's Markdown for a pushed model: where it is, its manifest, its TensorBoard."""
    root = uri.rstrip("/")
    lines = [
        f"# Model pushed to `{root}/`",
        "",
        f"- manifest (written last; read it before the weights): `{root}/manifest.json`",
    ]
    if (model_dir / "tensorboard").is_dir():
        lines += [
            f"- TensorBoard events of the training run: `{root}/tensorboard/`",
            "",
            f"Open them with `tensorboard --logdir {root}/tensorboard`, or point a Kubeflow "
            f"`Tensorboard` resource's `logspath` at `{root}/tensorboard`.",
        ]
    return "\n".join(lines) + "\n"
