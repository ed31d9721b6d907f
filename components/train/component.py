"""KFP interface of train. No logic here: the body imports the step and calls it."""

from kfp import dsl

from ..images import STEPS_IMAGE


@dsl.component(base_image=STEPS_IMAGE, install_kfp_package=False)
def train_model(recipe_yaml: str, dataset_dir: str, run_dir: str) -> str:
    """Train into RUN_DIR/train: torchrun here (distributed.backend=local) or a PyTorchJob that
    this step creates, watches and streams (pytorchjob; a retry adopts the job it created)."""
    from kubetune.components.train.kfp_body import train

    return train(recipe_yaml, dataset_dir, run_dir)
