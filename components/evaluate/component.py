"""KFP interface of evaluate. No logic here: the body imports the step and calls it."""

from kfp import dsl
from kfp.dsl import HTML, Metrics, Output

from ..images import STEPS_IMAGE


@dsl.component(base_image=STEPS_IMAGE, install_kfp_package=False)
def evaluate_model(
    recipe_yaml: str,
    model_dir: str,
    dataset_dir: str,
    run_dir: str,
    metrics: Output[Metrics],
    report: Output[HTML],
    workspace: str = "",
) -> str:
    """Tuned vs base model on the eval split (loss, perplexity, ROUGE, exact match) into
    RUN_DIR/eval; Metrics and the HTML report for the KFP UI. Returns the evaluation folder."""
    from kubetune.components.evaluate.kfp_body import evaluate

    return evaluate(recipe_yaml, model_dir, dataset_dir, run_dir, metrics, report.path)


@dsl.component(base_image=STEPS_IMAGE, install_kfp_package=False)
def quality_gate(eval_dir: str, workspace: str = "") -> bool:
    """Whether the evaluation passed the recipe's gate (eval.min_rouge_l, eval.max_eval_loss,
    eval.max_regression)."""
    from kubetune.components.evaluate.kfp_body import gate_passed

    return gate_passed(eval_dir)
