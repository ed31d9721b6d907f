"""KFP interface of the optional deploy step (serve.enabled). No logic here."""

from kfp import dsl
from kfp.dsl import Markdown, Output

from ..images import STEPS_IMAGE


@dsl.component(base_image=STEPS_IMAGE, install_kfp_package=False)
def deploy_model(recipe_yaml: str, summary: Output[Markdown], workspace: str = "") -> str:
    """Serve the pushed model (output.uri) with KServe: apply its InferenceService, wait until
    Ready, ask it serve.prompt; the answer goes into the Markdown. Returns the endpoint URL."""
    from kubetune.components.serve.kfp_body import deploy

    return deploy(recipe_yaml, summary.path)
