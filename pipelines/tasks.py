"""The pieces both pipelines (finetune.py, compare.py) are built from: the run's parameters
(one definition: PIPELINE_FIELDS), the resolve → fetch → prepare head, the train → merge →
evaluate body, and how a task is placed (workspace volume, Secrets, images, the GPU pool,
retries).
"""

# no `from __future__ import annotations`: KFP reads the pipeline's annotations as types
import inspect
import json
from collections.abc import Callable

import yaml
from kfp import dsl, kubernetes

from kubetune.components.config import RunConfig, dump_config
from kubetune.components.evaluate.component import evaluate_model
from kubetune.components.evaluate.harness import needs_hub
from kubetune.components.fetch_model.component import fetch_model
from kubetune.components.merge_adapter.component import merge_model
from kubetune.components.pipeline_steps.bodies import PIPELINE_FIELDS, field_value
from kubetune.components.pipeline_steps.component import resolve_recipe
from kubetune.components.prepare_dataset.component import prepare_dataset
from kubetune.components.train.component import train_model

S3_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL_S3", "AWS_REGION")
# A cluster retries a failed step (a preempted node, a hub or S3 hiccup) after 60 s, then 120 s.
# `kubetune run --local` turns that off (`no_retries`): on one machine a step fails for a
# reason a retry does not change, and the user should see it at once.
RETRIES = {"num_retries": 2, "backoff_duration": "60s", "backoff_factor": 2.0}


def no_retries() -> None:
    """Build pipelines without step retries from now on (this process: the local runner's)."""
    RETRIES["num_retries"] = 0


def retried(task):
    return task.set_retry(**RETRIES) if RETRIES["num_retries"] else task


def ws(cfg: RunConfig) -> dict:
    """The `workspace` input of a step: KFP's placeholder with a KFP workspace (KFP mounts the
    run's workspace in a task that gets it), nothing with a PVC of our own."""
    return (
        {"workspace": dsl.WORKSPACE_PATH_PLACEHOLDER} if cfg.kubernetes.workspace == "kfp" else {}
    )


def pipeline_config(cfg: RunConfig):
    """The run's KFP workspace (kubernetes.workspace: kfp): a ReadWriteMany PVC, since the
    training pods of every node mount it too."""
    k8s = cfg.kubernetes
    if k8s.workspace != "kfp":
        return None
    patch: dict = {"accessModes": ["ReadWriteMany"]}
    if k8s.workspace_storage_class:
        patch["storageClassName"] = k8s.workspace_storage_class
    return dsl.PipelineConfig(
        workspace=dsl.WorkspaceConfig(
            size=k8s.workspace_size, kubernetes=dsl.KubernetesWorkspaceConfig(pvcSpecPatch=patch)
        )
    )


def local_copy(cfg: RunConfig, workspace: str | None) -> RunConfig:
    """A local run (`workspace` is its folder) has no KFP workspace: its steps use the
    folder, as with a PVC of our own."""
    if workspace is None or cfg.kubernetes.workspace != "kfp":
        return cfg
    k8s = cfg.kubernetes.model_copy(update={"workspace": "pvc"})
    return cfg.model_copy(update={"kubernetes": k8s})


def on_cluster(task, cfg: RunConfig, s3: bool = True, hub: bool = False):
    """Workspace volume, credentials from Secrets, the steps image."""
    k8s = cfg.kubernetes
    task.set_container_image(k8s.steps_image)
    if k8s.workspace == "pvc":
        kubernetes.mount_pvc(task, pvc_name=k8s.workspace_pvc, mount_path=k8s.workspace_mount)
    if s3:
        kubernetes.use_secret_as_env(
            task,
            secret_name=k8s.s3_secret,
            secret_key_to_env={k: k for k in S3_KEYS},
            optional=True,
        )
    if hub and k8s.hf_secret:
        kubernetes.use_secret_as_env(
            task, secret_name=k8s.hf_secret, secret_key_to_env={"HF_TOKEN": "HF_TOKEN"}
        )
    return task


def hub_off(task):
    """A step after the fetch: it loads the model from the workspace copy, never the hub
    (prepare keeps the hub: its data may be a hub dataset)."""
    return task.set_env_variable("HF_HUB_OFFLINE", "1")


def on_gpu_pool(task, cfg: RunConfig):
    """The GPU node pool, its accelerators, and the CUDA image that can use them."""
    k8s = cfg.kubernetes
    task.set_container_image(k8s.trainer_image)
    for key, value in k8s.node_selector.items():
        kubernetes.add_node_selector(task, label_key=key, label_value=value)
    for t in k8s.tolerations:
        kubernetes.add_toleration(
            task,
            key=t.get("key"),
            operator=t.get("operator"),
            value=t.get("value"),
            effect=t.get("effect"),
            toleration_seconds=t.get("tolerationSeconds"),
        )
    task.set_accelerator_type(k8s.gpu_resource).set_accelerator_limit(eval_gpus(cfg))
    return task


def eval_gpus(cfg: RunConfig) -> int:
    """GPUs the evaluate task needs to hold the model in bf16 with 30% room for activations
    and the KV cache (generation spreads it over them with device_map="auto"), at most a
    node's worth; 1 when the model or the GPU is not known."""
    from kubetune.components.errors import UserError
    from kubetune.components.planner.architecture import architecture
    from kubetune.components.planner.plan import GPU_MEMORY_GB, gpus_needed

    memory_gb = cfg.hardware.gpu_memory_gb or GPU_MEMORY_GB.get(cfg.hardware.gpu)
    if not memory_gb:
        return 1
    try:
        params = architecture(cfg).total_params
    except UserError:
        return 1
    return min(gpus_needed(params, memory_gb), cfg.distributed.procs_per_node)


def recipe_parameter(cfg: RunConfig) -> str:
    """The recipe as the pipeline's `recipe_yaml` default: one line, because KFP writes
    parameter defaults into the IR's comment header and a multi-line default would break that
    YAML; JSON is YAML, so the recipe parses the same."""
    return json.dumps(yaml.safe_load(dump_config(cfg)), separators=(",", ":"))


def fetch_and_prepare(cfg: RunConfig, resolved):
    """After resolve_recipe: the model fetched once per revision into WORKSPACE/models (every
    later step reads that copy), then the data prepared. (run folder, recipe, prepare task)."""
    on_cluster(resolved, cfg, s3=False)
    run_dir = resolved.outputs["run_dir"]
    fetched = fetch_model(recipe_yaml=resolved.outputs["recipe_yaml"], run_dir=run_dir, **ws(cfg))
    retried(on_cluster(fetched, cfg, hub=True)).set_display_name("fetch model")
    recipe = fetched.output
    prepared = prepare_dataset(recipe_yaml=recipe, run_dir=run_dir, **ws(cfg))
    retried(on_cluster(prepared, cfg, hub=True)).set_display_name("prepare")
    return run_dir, recipe, prepared


def train_merge_evaluate(cfg: RunConfig, recipe, dataset_dir, run_dir, gpu: bool):
    """train → merge → evaluate under run_dir; (merge task, evaluate task)."""
    trained = train_model(recipe_yaml=recipe, dataset_dir=dataset_dir, run_dir=run_dir, **ws(cfg))
    # never cached: a cache hit would skip a run whose output may be gone
    on_cluster(trained, cfg, hub=True).set_caching_options(False).set_display_name("train")
    hub_off(trained)
    merged = merge_model(
        recipe_yaml=recipe, train_dir=trained.outputs["Output"], run_dir=run_dir, **ws(cfg)
    )
    retried(on_cluster(merged, cfg, hub=True)).set_display_name("merge")
    hub_off(merged)
    evaluated = evaluate_model(
        recipe_yaml=recipe,
        model_dir=merged.output,
        dataset_dir=dataset_dir,
        run_dir=run_dir,
        **ws(cfg),
    )
    retried(on_cluster(evaluated, cfg, hub=True)).set_display_name("evaluate")
    if not needs_hub(cfg.eval.lm_eval_tasks):
        hub_off(evaluated)  # registered lm-eval tasks read their datasets from the hub
    if gpu:
        on_gpu_pool(evaluated, cfg)
        if cfg.eval.engine == "vllm":  # vLLM pins its own torch: an image of its own
            evaluated.set_container_image(cfg.kubernetes.eval_image)
    return merged, evaluated


def recipe_fields(cfg: RunConfig) -> dict:
    """The recipe's value of every pipeline field parameter, by parameter name."""
    return {name: field_value(cfg, dotted) for dotted, name, _ in PIPELINE_FIELDS}


def with_field_parameters(body: Callable, leading: list[inspect.Parameter], cfg: RunConfig):
    """A pipeline function whose signature is `leading`, then one parameter per
    PIPELINE_FIELDS entry (the recipe's value as its default): KFP reads the signature, and the
    call hands `body` every argument by name. The fields are written once, in PIPELINE_FIELDS."""
    defaults = recipe_fields(cfg)
    fields = [parameter(name, kind, defaults[name]) for _, name, kind in PIPELINE_FIELDS]
    signature = inspect.Signature([*leading, *fields], return_annotation=str)

    def pipeline(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        return body(**bound.arguments)

    pipeline.__signature__ = signature  # type: ignore[attr-defined]
    pipeline.__name__ = pipeline.__qualname__ = body.__name__
    pipeline.__doc__ = body.__doc__
    return pipeline


def parameter(name: str, kind: type, default) -> inspect.Parameter:
    return inspect.Parameter(
        name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default, annotation=kind
    )


def resolve_task(cfg: RunConfig, recipe_yaml, overrides, workspace, fields: dict):
    """The pipeline's first task: the recipe with the run's field values and overrides."""
    return resolve_recipe(
        recipe_yaml=recipe_yaml,
        overrides=overrides,
        workspace=ws(cfg).get("workspace", workspace),
        run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
        **{name: fields[name] for _, name, _ in PIPELINE_FIELDS},
    ).set_display_name("resolve recipe")
