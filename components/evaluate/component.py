"""KFP interface of evaluate. No logic here: the body imports the step and calls it."""

from kfp import dsl
from kfp.dsl import HTML, Metrics, Output

from ..prepare_dataset.component import STEPS_IMAGE


@dsl.component(base_image=STEPS_IMAGE, install_kfp_package=False)
def evaluate_model(
    recipe_yaml: str,
    overrides: list,
    model_dir: str,
    dataset_dir: str,
    output_dir: str,
    baseline: str,
    metrics: Output[Metrics],
    report: Output[HTML],
) -> bool:
    """Generate answers for held-out prompts, score tuned vs base; returns whether the quality
    gate (eval.min_rouge_l / eval.max_eval_loss) passed. Model and dataset are paths (on the
    workspace volume) or model URIs; an empty baseline skips the base model."""
    from kubetune.components.evaluate.kfp_outputs import run_evaluate_component

    return run_evaluate_component(
        recipe_yaml,
        overrides,
        model_dir,
        dataset_dir,
        output_dir,
        baseline,
        metrics,
        report.path,
    )
