"""The fine-tuning pipeline (KFP v2): resolve_recipe → fetch_model → prepare_dataset → train →
merge → evaluate → push (only when the evaluation passes the recipe's quality gate).

`build_pipeline(cfg)` returns the pipeline for one recipe: the recipe's fields are its
parameters (with the recipe's values as defaults), so the KFP UI's run form shows and edits
them. Datasets and weights stay on the workspace volume; only their paths pass between tasks.
That volume is the existing PVC `kubernetes.workspace_pvc`, mounted at
`kubernetes.workspace_mount` in every step, or with `kubernetes.workspace: kfp` the run's own
KFP workspace (`dsl.PipelineConfig` / `WorkspaceConfig`: KFP creates the PVC for the run, of
`kubernetes.workspace_size` and `workspace_storage_class`, ReadWriteMany, and mounts it at
/kfp-workspace in each task whose `workspace` input is KFP's placeholder; the train task passes
it on to the training pods through its TaskConfig). S3 and hub
credentials come from Kubernetes Secrets as environment variables, never from parameters. The
train task is the PyTorchJob launcher (CPU); the GPU node pool's selector, tolerations,
accelerators and the CUDA trainer image go to the evaluate task, which generates with the model;
every CPU task runs in the steps image.
"""

# no `from __future__ import annotations`: KFP reads the pipeline's annotations as types
import inspect
from pathlib import Path
from typing import Optional

from kfp import dsl

from kubetune.components.config import RunConfig
from kubetune.components.evaluate.component import quality_gate
from kubetune.components.outputs import staged_file
from kubetune.components.push_model.component import push_model
from kubetune.components.serve.component import deploy_model
from kubetune.components.stages import stage_configs
from kubetune.pipelines.preflight import preflight
from kubetune.pipelines.tasks import (
    fetch_and_prepare,
    local_copy,
    no_retries,
    on_cluster,
    parameter,
    pipeline_config,
    recipe_fields,
    recipe_parameter,
    resolve_task,
    retried,
    train_merge_evaluate,
    with_field_parameters,
    ws,
)

__all__ = ["build_pipeline", "compile_pipeline", "no_retries"]

PIPELINE_NAME = "kubetune-finetune"


def build_pipeline(cfg: RunConfig, workspace: Optional[str] = None):  # noqa: UP045
    """The pipeline of one recipe; `workspace` overrides where the run folders go (a local
    folder for `kubetune run --local`, the PVC mount path on a cluster). Its parameters:
    recipe_yaml, overrides, workspace, then the recipe's PIPELINE_FIELDS."""
    cfg = local_copy(cfg, workspace)
    deploy = cfg.serve.enabled and workspace is None  # a local run has no cluster to serve on
    gpu = cfg.hardware.uses_gpu
    if cfg.stages:
        return build_staged_pipeline(cfg, workspace, deploy)

    def finetune(recipe_yaml, overrides, workspace, **fields):
        resolved = resolve_task(cfg, recipe_yaml, overrides, workspace, fields)
        run_dir, recipe, prepared = fetch_and_prepare(cfg, resolved)
        merged, evaluated = train_merge_evaluate(
            cfg, recipe, prepared.outputs["Output"], run_dir, gpu
        )
        return gate_push_deploy(cfg, recipe, merged, evaluated, deploy)

    leading = [
        parameter("recipe_yaml", str, recipe_parameter(cfg)),
        parameter("overrides", list, []),  # KEY=VALUE strings
        parameter("workspace", str, workspace or cfg.kubernetes.workspace_mount),
    ]
    return dsl.pipeline(
        name=PIPELINE_NAME,
        description=f"Fine-tune {cfg.model.name_or_path} ({cfg.method}) with kubetune: prepare, "
        "train (PyTorchJob), merge, evaluate, push to S3 when the quality gate passes.",
        pipeline_config=pipeline_config(cfg),
    )(with_field_parameters(finetune, leading, cfg))


def build_staged_pipeline(cfg: RunConfig, workspace: Optional[str], deploy: bool):  # noqa: UP045
    """A recipe with `stages:` (components/stages.py): resolve → fetch → prepare → train →
    merge → evaluate once per stage, each stage's recipe fixed when compiled and its model
    the merged model of the stage before; the last stage is gated and pushed. Parameters:
    overrides (KEY=VALUE for every stage) and workspace."""
    configs = stage_configs(cfg)
    gpu = cfg.hardware.uses_gpu

    def staged(overrides: list, workspace: str) -> str:
        previous = None
        for stage in configs:
            fields = recipe_fields(stage)
            if previous is not None:  # this stage trains on the model the last one merged
                fields["model_name_or_path"] = previous.output
            resolved = resolve_task(stage, recipe_parameter(stage), overrides, workspace, fields)
            resolved.set_display_name(f"resolve {stage.stage}")
            run_dir, recipe, prepared = fetch_and_prepare(stage, resolved)
            previous, evaluated = train_merge_evaluate(
                stage, recipe, prepared.outputs["Output"], run_dir, gpu
            )
        return gate_push_deploy(configs[-1], recipe, previous, evaluated, deploy)

    staged.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [
            parameter("overrides", list, []),
            parameter("workspace", str, workspace or cfg.kubernetes.workspace_mount),
        ],
        return_annotation=str,
    )
    names = " then ".join(str(c.stage) for c in configs)
    return dsl.pipeline(
        name=PIPELINE_NAME,
        description=f"Fine-tune {cfg.model.name_or_path} with kubetune in stages ({names}): "
        "each stage prepares, trains, merges and evaluates on the model of the stage before; "
        "the last is pushed to S3 when the quality gate passes.",
        pipeline_config=pipeline_config(cfg),
    )(staged)


def gate_push_deploy(cfg: RunConfig, recipe, merged, evaluated, deploy: bool):
    """The quality gate on the evaluation, then push (and serve) when it passes."""
    gate = quality_gate(eval_dir=evaluated.outputs["Output"], **ws(cfg))
    gate.set_display_name("quality gate")
    on_cluster(gate, cfg, s3=False)
    with dsl.If(gate.output == True, name="gate-passed"):  # noqa: E712
        pushed = push_model(
            recipe_yaml=recipe,
            model_dir=merged.output,
            eval_dir=evaluated.outputs["Output"],
            **ws(cfg),
        )
        retried(on_cluster(pushed, cfg).set_caching_options(False))
        pushed.set_display_name("push")
        if deploy:  # serve it with KServe, ask it one question
            deployed = deploy_model(recipe_yaml=recipe, **ws(cfg)).after(pushed)
            on_cluster(deployed, cfg, s3=False).set_caching_options(False)
            deployed.set_display_name("deploy")
    return evaluated.outputs["Output"]


def compile_pipeline(cfg: RunConfig, path: str) -> None:
    from kfp import compiler

    preflight(cfg)
    with staged_file(Path(path)) as tmp:  # a full disk leaves no half-written YAML
        compiler.Compiler().compile(build_pipeline(cfg), package_path=str(tmp))
