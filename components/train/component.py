"""KFP interface of train. No logic here: the body imports the step and calls it."""

from kfp import dsl
from kfp.dsl import Markdown, Metrics, Output

from ..images import STEPS_IMAGE

# What the train task's own settings pass on to the PyTorchJob/TrainJob (KFP's TaskConfig):
# resources, env, node selector, tolerations, affinity and volumes set on the task in the
# pipeline, beside the recipe's (the recipe wins where both set the same thing). The env and
# volumes apply to the task itself too: the launcher needs the same workspace.
PASSTHROUGHS = [
    dsl.TaskConfigField.RESOURCES,
    dsl.TaskConfigField.KUBERNETES_NODE_SELECTOR,
    dsl.TaskConfigField.KUBERNETES_TOLERATIONS,
    dsl.TaskConfigField.KUBERNETES_AFFINITY,
    dsl.TaskConfigPassthrough(field=dsl.TaskConfigField.ENV, apply_to_task=True),
    dsl.TaskConfigPassthrough(field=dsl.TaskConfigField.KUBERNETES_VOLUMES, apply_to_task=True),
]


@dsl.component(
    base_image=STEPS_IMAGE, install_kfp_package=False, task_config_passthroughs=PASSTHROUGHS
)
def train_model(
    recipe_yaml: str,
    dataset_dir: str,
    run_dir: str,
    metrics: Output[Metrics],
    summary: Output[Markdown],
    task_config: dsl.TaskConfig,
    workspace: str = "",
) -> str:
    """Train into RUN_DIR/train: torchrun here (distributed.backend=local) or a PyTorchJob or
    TrainJob that this step creates, watches and streams (a retry adopts the job it created).
    The task's TaskConfig reaches that job; the final progress, loss and tokens/s become the
    task's Metrics; the speed model's prediction against the measured tokens/s and train time
    its Markdown summary."""
    from kubetune.components.train.kfp_body import train

    return train(recipe_yaml, dataset_dir, run_dir, metrics, task_config, summary.path)
