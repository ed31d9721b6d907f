"""`kubetune compare`'s own steps inside its KFP pipeline (component.py calls these): the
branches, one per method, and the comparison over their evaluations."""

from __future__ import annotations

from pathlib import Path

from ..config import parse_recipe


def method_branches(recipe_yaml: str, run_dir: str, dataset_dir: str, methods: list) -> list:
    """The branches of `kubetune compare`, one per method: the recipe with `method` set
    (validated: a method the recipe cannot run fails here, naming it), the branch's folder
    RUN_DIR/methods/METHOD and the prepared data they share. ParallelFor iterates over them."""
    from ..config import dump_config
    from ..train.llama_adapter import check_recipe

    branches = []
    for method in methods:
        cfg = parse_recipe(recipe_yaml, "recipe", [f"method={method}"])
        check_recipe(cfg)
        out = Path(run_dir) / "methods" / method
        out.mkdir(parents=True, exist_ok=True)
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

    from . import compare_methods

    cfg = parse_recipe(recipe_yaml, "recipe")
    out = Path(run_dir) / "comparison"
    compare_methods(cfg.model.name_or_path, [str(d) for d in eval_dirs], out)
    shutil.copyfile(out / "report.html", report_path)
    shutil.copyfile(out / "comparison.md", summary_path)
    print((out / "comparison.md").read_text())
    return str(out)
