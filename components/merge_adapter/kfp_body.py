"""The merge step inside a KFP pipeline (its component.py calls this): the merged model into
RUN_DIR/model (a full fine-tune's folder passes through)."""

from __future__ import annotations

from ..config import parse_recipe
from ..outputs import run_folder


def merge(recipe_yaml: str, train_dir: str, run_dir: str) -> str:
    from .step import merge as merge_step

    cfg = parse_recipe(recipe_yaml, "recipe")
    if cfg.method == "full":  # full fine-tuning wrote the whole model already
        return train_dir
    out = run_folder(run_dir) / "model"
    merge_step(cfg, train_dir, out, overwrite=True)
    return str(out)
