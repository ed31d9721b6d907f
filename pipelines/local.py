"""`kubetune run RECIPE --local`: the whole pipeline on this machine through KFP's local runner
(`kfp.local`, subprocess runner, this Python environment): the same components and DAG as on
a cluster, with a local folder as the workspace volume."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from kubetune.components.config import load_recipe
from kubetune.components.errors import UserError
from kubetune.components.storage import is_s3


def _local_setup(recipe: str, overrides: list[str], workspace: str):
    """(recipe config, absolute workspace) with kfp.local initialised on that workspace."""
    cfg = load_recipe(recipe, overrides)
    if not is_s3(cfg.output.uri):  # every task is its own process: give them one absolute place
        overrides = [*overrides, f"output.uri={Path(cfg.output.uri).resolve()}"]
        cfg = load_recipe(recipe, overrides)
    ws = Path(workspace).resolve()
    ws.mkdir(parents=True, exist_ok=True)

    from kfp import local

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(ws / "kfp-root"))
    return cfg, ws


def run_local(recipe: str, overrides: list[str], workspace: str) -> int:
    from kubetune.pipelines.finetune import build_pipeline

    cfg, ws = _local_setup(recipe, overrides, workspace)
    pipeline = build_pipeline(cfg, workspace=str(ws))
    started = time.monotonic()
    try:
        task = pipeline()
    except RuntimeError as exc:  # kfp.local: a task failed; its log is above
        print(f"error: the pipeline failed: {exc}", file=sys.stderr)
        return 1
    seconds = time.monotonic() - started
    eval_dir = Path(task.output)
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    tuned, base = metrics["tuned"], metrics["baseline"]
    print(f"\npipeline finished in {seconds:.0f} s (run folder {eval_dir.parent})")
    print(f"{'':6} {'eval loss':>10} {'ROUGE-1':>8} {'ROUGE-2':>8} {'ROUGE-L':>8}")
    for name, m in (("base", base), ("tuned", tuned)):
        print(
            f"{name:6} {m['eval_loss']:10.4f} {m['rouge1']:8.4f} {m['rouge2']:8.4f} "
            f"{m['rougeL']:8.4f}"
        )
    print(f"report: {eval_dir / 'report.html'}")
    if metrics["gate"]["passed"]:
        print(f"model:  {cfg.output.uri} (manifest.json lists every file)")
    else:
        failed = ", ".join(
            f"{c['metric']} {c['value']} {c['op']} {c['threshold']}"
            for c in metrics["gate"]["checks"]
            if not c["passed"]
        )
        raise UserError(f"the quality gate failed ({failed}): the model was not pushed")
    return 0


def compare_local(recipe: str, overrides: list[str], methods: list[str], workspace: str) -> int:
    """`kubetune compare --local`: the comparison pipeline here, one branch at a time (the
    machine's cores are shared: branches side by side would skew each other's timings)."""
    from kubetune.pipelines.compare import build_compare_pipeline

    cfg, ws = _local_setup(recipe, overrides, workspace)
    pipeline = build_compare_pipeline(cfg, methods, workspace=str(ws), parallelism=1)
    started = time.monotonic()
    try:
        task = pipeline()
    except RuntimeError as exc:  # kfp.local: a task failed; its log is above
        print(f"error: the pipeline failed: {exc}", file=sys.stderr)
        return 1
    out = Path(task.output)
    print(f"\ncomparison finished in {time.monotonic() - started:.0f} s (run folder {out.parent})")
    print((out / "comparison.md").read_text(), end="")
    print(f"report: {out / 'report.html'}")
    return 0
