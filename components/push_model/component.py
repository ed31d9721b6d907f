"""KFP interface of push_model. No logic here: the body imports the step and calls it."""

from kfp import dsl
from kfp.dsl import Markdown, Output

from ..images import STEPS_IMAGE


@dsl.component(base_image=STEPS_IMAGE, install_kfp_package=False)
def push_model(
    recipe_yaml: str,
    model_dir: str,
    eval_dir: str,
    summary: Output[Markdown],
    workspace: str = "",
) -> str:
    """Upload the model (and its training run's TensorBoard events) to output.uri with
    checksums, manifest.json last (evaluation metrics included); a Markdown summary links them.
    Returns the manifest's URI."""
    from kubetune.components.push_model.kfp_body import push

    return push(recipe_yaml, model_dir, eval_dir, summary.path)
