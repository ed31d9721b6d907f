"""The train step inside a KFP pipeline (its component.py calls this): train into RUN_DIR/train,
here or through the job the recipe's backend names; log the last step's figures as Metrics."""

from __future__ import annotations

import json
from pathlib import Path

from ..artifacts import METRICS_FILE
from ..config import parse_recipe
from ..outputs import run_folder


def train(
    recipe_yaml: str,
    dataset_dir: str,
    run_dir: str,
    metrics=None,
    task_config=None,
    summary_path: str | None = None,
) -> str:
    from ..backends.pod import hashed_job_name
    from ..backends.taskconfig import TaskConfig
    from .step import train as launch

    # what the task passes through to the training job, and the same job name on every retry
    # of this task: the launcher adopts the job it created
    task = TaskConfig.from_kfp(task_config) if task_config is not None else None
    name = hashed_job_name("kfp", run_dir)
    out = run_folder(run_dir) / "train"
    code = launch(parse_recipe(recipe_yaml, "recipe"), dataset_dir, out, task, name)
    if code != 0:
        raise RuntimeError(f"training failed (exit code {code}); see the log above")
    if metrics is not None:
        for name, value in final_figures(out).metrics().items():
            metrics.log_metric(name, value)
        for name, value in eval_figures(out).items():
            metrics.log_metric(name, value)
    if summary_path is not None:
        from ..planner.forecast import prediction_markdown

        record = json.loads((out / METRICS_FILE).read_text())
        Path(summary_path).write_text(prediction_markdown(record.get("prediction")))
    return str(out)


def eval_figures(out: Path) -> dict[str, float]:
    """The objective's metrics on the eval split after the last step, as `eval_NAME` (a
    preference objective's reward accuracy and margin, rewards and log-probabilities)."""
    record = json.loads((out / METRICS_FILE).read_text())
    figures = {"eval_loss": record.get("eval_loss")}
    figures.update({f"eval_{k}": v for k, v in (record.get("eval_metrics") or {}).items()})
    return {k: float(v) for k, v in figures.items() if v is not None}


def final_figures(out: Path):
    """The last step's figures, from the run's metrics.json: what its last log line and its
    last trainer status update said."""
    from .status import Figures

    record = json.loads((out / METRICS_FILE).read_text())
    steps = record["steps"]
    return Figures(
        step=steps,
        steps=steps,
        loss=next((v for _, v in reversed(record["loss"]) if v is not None), float("nan")),
        tokens_per_second=record.get("tokens_per_second") or 0.0,
        percent=100,
        eta_seconds=0,
    )
