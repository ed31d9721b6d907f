"""KFP interface of prepare_dataset. No logic here: the body imports the step and calls it."""

from kfp import dsl
from kfp.dsl import Markdown, Metrics, Output

from ..images import STEPS_IMAGE


@dsl.component(base_image=STEPS_IMAGE, install_kfp_package=False)
def prepare_dataset(
    recipe_yaml: str,
    run_dir: str,
    metrics: Output[Metrics],
    summary: Output[Markdown],
    workspace: str = "",
) -> str:
    """Tokenize, mask and pack the recipe's dataset into RUN_DIR/dataset; log its stats as
    Metrics and a Markdown summary. Returns the dataset folder."""
    from kubetune.components.prepare_dataset.kfp_body import prepare

    return prepare(recipe_yaml, run_dir, metrics, summary.path)
