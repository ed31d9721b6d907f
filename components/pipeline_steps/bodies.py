"""The pipeline's own parameters and the body of its first step, resolve_recipe (each step's
KFP body lives in its own package's kfp_body.py, beside its component.py).

Every step after `resolve_recipe` gets the resolved recipe YAML and the run's folder on the
workspace volume (`WORKSPACE/runs/RUN_ID`); datasets and weights stay there and only their
paths travel between tasks, never the bytes through KFP's artifact store.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..config import RunConfig

# Recipe fields that the pipeline exposes as its own parameters (the KFP UI's run form), with
# the parameter name each one gets. Any other field: the `overrides` parameter (KEY=VALUE).
PIPELINE_FIELDS = (
    ("model.name_or_path", "model_name_or_path", str),
    ("data.path", "data_path", str),
    ("data.format", "data_format", str),
    ("data.max_seq_len", "data_max_seq_len", int),
    ("method", "method", str),
    ("lora.r", "lora_r", int),
    ("lora.alpha", "lora_alpha", float),
    ("train.epochs", "train_epochs", float),
    ("train.lr", "train_lr", float),
    ("train.micro_batch_size", "train_micro_batch_size", str),  # a number or auto
    ("train.grad_accum", "train_grad_accum", int),
    ("distributed.nodes", "distributed_nodes", int),
    ("distributed.procs_per_node", "distributed_procs_per_node", int),
    ("distributed.backend", "distributed_backend", str),
    ("eval.num_prompts", "eval_num_prompts", int),
    ("output.uri", "output_uri", str),
)


def field_value(cfg: RunConfig, dotted: str):
    """The recipe's value of a pipeline field, as the field's parameter type (KFP refuses an
    integer default for a float parameter, and a field's default is not converted by pydantic:
    `lora.alpha` is 32 in a recipe without a lora section)."""
    node: Any = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    kind = next(kind for field, _, kind in PIPELINE_FIELDS if field == dotted)
    return kind(node)


def resolve(recipe_yaml: str, overrides: list, fields: dict, workspace: str, run_id: str):
    """Apply the pipeline's field parameters, then `overrides`, to the recipe; validate it.
    Returns (resolved recipe YAML, run folder)."""
    from ..config import dump_config, parse_recipe

    sets = [f"{dotted}={json.dumps(fields[name])}" for dotted, name, _ in PIPELINE_FIELDS]
    cfg = parse_recipe(recipe_yaml, "recipe", sets + [str(o) for o in overrides])
    # a stage of a staged recipe (components/stages.py): a run folder of its own beside the run's
    run_dir = Path(workspace) / "runs" / (f"{run_id}-{cfg.stage}" if cfg.stage else run_id)
    run_dir.mkdir(parents=True, exist_ok=True)
    return dump_config(cfg), str(run_dir)
