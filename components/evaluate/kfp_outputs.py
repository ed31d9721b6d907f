"""What the evaluate KFP component shows in the KFP UI: Metrics and the HTML report."""

from __future__ import annotations

import shutil
from pathlib import Path


def run_evaluate_component(
    recipe_yaml: str,
    overrides: list,
    model_dir: str,
    dataset_path: str,
    output_dir: str,
    baseline: str,
    metrics,
    report_path: str,
) -> bool:
    """The whole body of the KFP component: run the step, log its metrics, copy its report."""
    from ..config import parse_recipe
    from .step import evaluate, kfp_metrics

    cfg = parse_recipe(recipe_yaml, "recipe", [str(o) for o in overrides])
    result = evaluate(
        cfg, model_dir, dataset_path, output_dir, baseline=baseline or None, overwrite=True
    )
    for name, value in kfp_metrics(result).items():
        metrics.log_metric(name, value)
    shutil.copyfile(Path(output_dir) / "report.html", report_path)
    return bool(result["gate"]["passed"])
