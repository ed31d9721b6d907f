"""The evaluate step and the quality gate inside a KFP pipeline (component.py calls these)."""

from __future__ import annotations

import json
from pathlib import Path

from ..artifacts import METRICS_FILE
from ..config import parse_recipe
from ..outputs import run_folder


def evaluate(
    recipe_yaml: str, model_dir: str, dataset_dir: str, run_dir: str, metrics, report_path: str
) -> str:
    import shutil

    from .step import evaluate as run_evaluate
    from .step import kfp_metrics

    cfg = parse_recipe(recipe_yaml, "recipe")
    out = run_folder(run_dir) / "eval"
    result = run_evaluate(
        cfg, model_dir, dataset_dir, out, baseline=cfg.model.name_or_path, overwrite=True
    )
    for name, value in kfp_metrics(result).items():
        metrics.log_metric(name, value)
    shutil.copyfile(out / "report.html", report_path)
    return str(out)


def gate_passed(eval_dir: str) -> bool:
    metrics = json.loads((Path(eval_dir) / METRICS_FILE).read_text())
    checks = metrics["gate"]["checks"]
    for check in checks:
        print(
            f"{check['metric']} {check['value']} {check['op']} {check['threshold']}: "
            f"{'passed' if check['passed'] else 'FAILED'}"
        )
    if not checks:
        print(
            "no quality gate set (eval.min_rouge_l, eval.max_eval_loss, eval.max_regression): passed"
        )
    return bool(metrics["gate"]["passed"])
