"""The prepare step inside a KFP pipeline (its component.py calls this): the dataset into
RUN_DIR/dataset, its stats as KFP Metrics and Markdown."""

from __future__ import annotations

from ..config import parse_recipe
from ..outputs import run_folder


def prepare(recipe_yaml: str, run_dir: str, metrics, summary_path: str) -> str:
    from .kfp_outputs import report_to_kfp
    from .step import prepare as prepare_step

    out = run_folder(run_dir) / "dataset"
    stats = prepare_step(parse_recipe(recipe_yaml, "recipe"), out, overwrite=True)
    report_to_kfp(stats, metrics, summary_path)
    return str(out)
