"""KFP interface of the pipeline's first step: the recipe with the run's parameters applied."""

from typing import NamedTuple

from kfp import dsl

from ..images import STEPS_IMAGE


@dsl.component(base_image=STEPS_IMAGE, install_kfp_package=False)
def resolve_recipe(
    recipe_yaml: str,
    overrides: list,
    workspace: str,
    run_id: str,
    model_name_or_path: str,
    data_path: str,
    data_format: str,
    data_max_seq_len: int,
    method: str,
    lora_r: int,
    lora_alpha: float,
    train_epochs: float,
    train_lr: float,
    train_micro_batch_size: str,
    train_grad_accum: int,
    distributed_nodes: int,
    distributed_procs_per_node: int,
    distributed_backend: str,
    eval_num_prompts: int,
    output_uri: str,
) -> NamedTuple("Outputs", [("recipe_yaml", str), ("run_dir", str)]):
    """Apply the run's parameters and KEY=VALUE overrides to the recipe and validate it (a bad
    value fails here, naming the key); create the run's folder on the workspace volume."""
    from collections import namedtuple

    from kubetune.components.pipeline_steps.bodies import PIPELINE_FIELDS, resolve

    given = dict(locals())
    fields = {name: given[name] for _, name, _ in PIPELINE_FIELDS}
    recipe, run_dir = resolve(recipe_yaml, overrides, fields, workspace, run_id)
    return namedtuple("Outputs", ["recipe_yaml", "run_dir"])(recipe, run_dir)
