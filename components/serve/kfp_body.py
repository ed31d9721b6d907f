"""The deploy step inside a KFP pipeline (its component.py calls this)."""

from __future__ import annotations

from pathlib import Path

from ..config import parse_recipe


def deploy(recipe_yaml: str, summary_path: str) -> str:
    from .deploy import deploy as run_deploy
    from .deploy import deployed_summary

    cfg = parse_recipe(recipe_yaml, "recipe")
    result = run_deploy(cfg, cfg.output.uri)
    Path(summary_path).write_text(deployed_summary(result))
    return result["url"]
