"""The train step inside a KFP pipeline (its component.py calls this): train into RUN_DIR/train,
here or through the job the recipe's backend names; log the last step's figures as Metrics."""

from __future__ import annotations

import json
import os
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
    from ..backends.pytorchjob import hashed_job_name
    from ..backends.taskconfig import ENV, TaskConfig
    from .step import train as launch

    # the same name on every retry of this task: the launcher adopts the job it created
    os.environ.setdefault("KUBETUNE_JOB_NAME", hashed_job_name("kfp", run_dir))
    if task_config is not None:  # what the task passes through to the training job
        os.environ[ENV] = TaskConfig.from_kfp(task_config).to_json()
    out = run_folder(run_dir) / "train"
    code = launch(parse_recipe(recipe_yaml, "recipe"), dataset_dir, out)
    if code != 0:
        raise RuntimeError(f"training failed (exit code {code}); see the log above")
    if metrics is not None:
        for name, value in final_figures(out).metrics().items():
            metrics.log_metric(name, value)
    if summary_path is not None:
        from ..planner.forecast import prediction_markdown

        record = json.loads((out / METRICS_FILE).read_text())
        Path(summary_path).write_text(prediction_markdown(record.get("prediction")))
    return str(out)


def final_figures(out: Path):
    """The last step's figures, from the run's metrics.json: what its last log line and its
    last trainer status update said."""
    from .status import Figures

    record = json.loads((out / METRICS_FILE).read_text())
    steps = record["steps"]
    return Figures(
        step=steps,
        steps=steps,
        loss=record["loss"][-1][1] if record["loss"] else float("nan"),
        tokens_per_second=record.get("tokens_per_second") or 0.0,
        percent=100,
        eta_seconds=0,
    )
