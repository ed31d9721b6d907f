"""KFP interface of fetch_model. No logic here: the body imports the step and calls it."""

from kfp import dsl

from ..images import STEPS_IMAGE


@dsl.component(base_image=STEPS_IMAGE, install_kfp_package=False)
def fetch_model(recipe_yaml: str, run_dir: str, workspace: str = "") -> str:
    """Download the hub or s3:// model once per revision into WORKSPACE/models/NAME@REVISION
    (staged, renamed when complete, reused by later runs); returns the recipe with
    model.local_dir set, which every later step and PyTorchJob pod loads from."""
    from kubetune.components.fetch_model.kfp_body import fetch

    return fetch(recipe_yaml, run_dir)
