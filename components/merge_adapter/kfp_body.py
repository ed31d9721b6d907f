"""The merge step inside a KFP pipeline (its component.py calls this): the merged model into
RUN_DIR/model (a full fine-tune's folder passes through)."""

from __future__ import annotations

from pathlib import Path

from ..config import parse_recipe
from ..methods import method_of
from ..outputs import run_folder


def merge(recipe_yaml: str, train_dir: str, run_dir: str) -> str:
    cfg = parse_recipe(recipe_yaml, "recipe")
    out = run_folder(run_dir) / "model"
    if method_of(cfg).merge(cfg, Path(train_dir), out, overwrite=True) is None:
        return train_dir  # full fine-tuning wrote the whole model already
    return str(out)
