"""KFP interface of merge_adapter. No logic here: the body imports the step and calls it."""

from kfp import dsl

from ..images import STEPS_IMAGE


@dsl.component(base_image=STEPS_IMAGE, install_kfp_package=False)
def merge_model(recipe_yaml: str, train_dir: str, run_dir: str, workspace: str = "") -> str:
    """Fold the trained adapter into the base weights, shard by shard, into RUN_DIR/model
    (a full fine-tune's folder is passed through). Returns the model folder."""
    from kubetune.components.merge_adapter.kfp_body import merge

    return merge(recipe_yaml, train_dir, run_dir)
