"""KFP interfaces of `kubetune compare`'s own steps. No logic here: the bodies do the work."""

from kfp import dsl
from kfp.dsl import HTML, Markdown, Output

from ..images import STEPS_IMAGE


@dsl.component(base_image=STEPS_IMAGE, install_kfp_package=False)
def method_branches(
    recipe_yaml: str, run_dir: str, dataset_dir: str, methods: str, workspace: str = ""
) -> list:
    """One branch per method of `methods` (lora,adapter:train.lr=9e-3): {method, recipe_yaml,
    run_dir, dataset_dir}."""
    from kubetune.components.compare_methods.kfp_body import method_branches as body

    return body(recipe_yaml, run_dir, dataset_dir, methods)


@dsl.component(base_image=STEPS_IMAGE, install_kfp_package=False)
def compare_methods(
    recipe_yaml: str,
    eval_dirs: list,
    run_dir: str,
    report: Output[HTML],
    table: Output[Markdown],
    workspace: str = "",
) -> str:
    """Every method's parameters, time, tokens/s, memory, loss, ROUGE-L and answers side by
    side into RUN_DIR/comparison. Returns that folder."""
    from kubetune.components.compare_methods.kfp_body import compare

    return compare(recipe_yaml, eval_dirs, run_dir, report.path, table.path)
