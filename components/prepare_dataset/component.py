"""KFP interface of prepare_dataset. No logic here: the body imports the step and calls it."""

from kfp import dsl
from kfp.dsl import Dataset, Markdown, Metrics, Output

STEPS_IMAGE = "ghcr.io/kubetune/steps:0.1.0"


@dsl.component(base_image=STEPS_IMAGE, install_kfp_package=False)
def prepare_dataset(
    recipe_yaml: str,
    overrides: list,
    dataset: Output[Dataset],
    metrics: Output[Metrics],
    summary: Output[Markdown],
):
    """Tokenize, mask and pack the recipe's dataset into train/eval splits (see the README)."""
    from kubetune.components.prepare_dataset.kfp_outputs import run_prepare_component

    run_prepare_component(recipe_yaml, overrides, dataset.path, metrics, summary.path)
