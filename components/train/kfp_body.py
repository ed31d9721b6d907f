"""The train step inside a KFP pipeline (its component.py calls this): train into RUN_DIR/train,
here or through the job the recipe's backend names."""

from __future__ import annotations

import os
from pathlib import Path

from ..config import parse_recipe


def train(recipe_yaml: str, dataset_dir: str, run_dir: str) -> str:
    from ..cluster.pytorchjob import job_name
    from .step import train as launch

    # the same name on every retry of this task: the launcher adopts the job it created
    os.environ.setdefault("KUBETUNE_JOB_NAME", job_name("kfp", run_dir))
    out = Path(run_dir) / "train"
    code = launch(parse_recipe(recipe_yaml, "recipe"), dataset_dir, out)
    if code != 0:
        raise RuntimeError(f"training failed (exit code {code}); see the log above")
    return str(out)
