"""`kubetune compare`'s own steps inside its KFP pipeline (component.py calls these): the
branches, one per method, and the comparison over their evaluations."""

from __future__ import annotations

from pathlib import Path

from ..config import parse_recipe
from ..outputs import run_folder


def method_branches(recipe_yaml: str, run_dir: str, dataset_dir: str, methods: str) -> list:
    """The branches of `kubetune compare`, one per method of the `--methods` text: the recipe
    with `method` and the branch's settings set (settings.py: published defaults, the recipe's
    `compare` section, the command line; validated, a method the recipe cannot run fails here,
    naming it), the branch's folder RUN_DIR/methods/METHOD with settings.json (what the branch
    trains with, for the comparison's report) and the prepared data they share. ParallelFor
    iterates over them."""
    import json

    from ..config import dump_config
    from ..methods import method_of
    from .settings import branch_config, parse_methods

    names, extra = parse_methods(methods)
    base = parse_recipe(recipe_yaml, "recipe")
    branches = []
    for method in names:
        cfg, settings = branch_config(recipe_yaml, base, method, extra.get(method))
        method_of(cfg).check_model(cfg)
        out = Path(run_dir) / "methods" / method
        out.mkdir(parents=True, exist_ok=True)
        record = {
            "method": method,
            "lr": cfg.train.lr,
            "settings": {k: {"value": v, "from": origin} for k, (v, origin) in settings.items()},
        }
        (out / "settings.json").write_text(json.dumps(record, indent=1) + "\n")
        branches.append(
            {
                "method": method,
                "recipe_yaml": dump_config(cfg),
                "run_dir": str(out),
                "dataset_dir": dataset_dir,
            }
        )
    return branches


def compare(recipe_yaml: str, eval_dirs: list, run_dir: str, report_path: str, summary_path: str):
    """The comparison table and report over every branch's evaluation, into
    RUN_DIR/comparison; the report and the Markdown table for the KFP UI."""
    import shutil

    from .step import compare as compare_step

    cfg = parse_recipe(recipe_yaml, "recipe")
    out = run_folder(run_dir) / "comparison"
    compare_step(cfg.model.name_or_path, [str(d) for d in eval_dirs], out)
    shutil.copyfile(out / "report.html", report_path)
    shutil.copyfile(out / "comparison.md", summary_path)
    print((out / "comparison.md").read_text())
    return str(out)
