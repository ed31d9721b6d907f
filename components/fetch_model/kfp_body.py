"""The fetch step inside a KFP pipeline (its component.py calls this): the model once per
revision into WORKSPACE/models, the recipe pointing at that copy."""

from __future__ import annotations

from pathlib import Path

from ..config import parse_recipe


def fetch(recipe_yaml: str, run_dir: str) -> str:
    """Fetch the model once per revision into WORKSPACE/models (the workspace holds run_dir
    as WORKSPACE/runs/RUN_ID); returns the recipe pointing at that copy (model.local_dir)."""
    from ..config import dump_config
    from .step import fetch_summary, fetched_config

    cfg, record = fetched_config(parse_recipe(recipe_yaml, "recipe"), Path(run_dir).parent.parent)
    print(fetch_summary(cfg, record))
    return dump_config(cfg)
