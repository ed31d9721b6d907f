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
import json
from typing import Optional

import yaml
from kfp import dsl, kubernetes

from kubetune.components.backends.pytorchjob import uses_gpu
from kubetune.components.config import RunConfig, dump_config
from kubetune.components.errors import UserError
from kubetune.components.evaluate.component import evaluate_model, quality_gate
from kubetune.components.evaluate.harness import needs_hub
from kubetune.components.fetch_model.component import fetch_model
from kubetune.components.merge_adapter.component import merge_model
from kubetune.components.pipeline_steps.bodies import PIPELINE_FIELDS, field_value
from kubetune.components.pipeline_steps.component import resolve_recipe
from kubetune.components.prepare_dataset.component import prepare_dataset
from kubetune.components.push_model.component import push_model
from kubetune.components.serve.component import deploy_model
from kubetune.components.train.component import train_model

PIPELINE_NAME = "kubetune-finetune"
S3_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL_S3", "AWS_REGION")
# A cluster retries a failed step (a preempted node, a hub or S3 hiccup) after 60 s, then 120 s.
# `kubetune run --local` turns that off (`no_retries`): on one machine a step fails for a
# reason a retry does not change, and the user should see it at once.
RETRIES = {"num_retries": 2, "backoff_duration": "60s", "backoff_factor": 2.0}


def no_retries() -> None:
    """Build pipelines without step retries from now on (this process: the local runner's)."""
    RETRIES["num_retries"] = 0


def _retried(task):
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


def _on_cluster(task, cfg: RunConfig, s3: bool = True, hub: bool = False):
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


def _hub_off(task):
    """A step after the fetch: it loads the model from the workspace copy, never the hub
    (prepare keeps the hub: its data may be a hub dataset)."""
    return task.set_env_variable("HF_HUB_OFFLINE", "1")


def _on_gpu_pool(task, cfg: RunConfig):
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
    from kubetune.components.train.plan import GPU_MEMORY_GB, architecture, gpus_needed

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
    _on_cluster(resolved, cfg, s3=False)
    run_dir = resolved.outputs["run_dir"]
    fetched = fetch_model(recipe_yaml=resolved.outputs["recipe_yaml"], run_dir=run_dir, **ws(cfg))
    _retried(_on_cluster(fetched, cfg, hub=True)).set_display_name("fetch model")
    recipe = fetched.output
    prepared = prepare_dataset(recipe_yaml=recipe, run_dir=run_dir, **ws(cfg))
    _retried(_on_cluster(prepared, cfg, hub=True)).set_display_name("prepare")
    return run_dir, recipe, prepared


def train_merge_evaluate(cfg: RunConfig, recipe, dataset_dir, run_dir, gpu: bool):
    """train → merge → evaluate under run_dir; (merge task, evaluate task)."""
    trained = train_model(recipe_yaml=recipe, dataset_dir=dataset_dir, run_dir=run_dir, **ws(cfg))
    # never cached: a cache hit would skip a run whose output may be gone
    _on_cluster(trained, cfg, hub=True).set_caching_options(False).set_display_name("train")
    _hub_off(trained)
    merged = merge_model(
        recipe_yaml=recipe, train_dir=trained.outputs["Output"], run_dir=run_dir, **ws(cfg)
    )
    _retried(_on_cluster(merged, cfg, hub=True)).set_display_name("merge")
    _hub_off(merged)
    evaluated = evaluate_model(
        recipe_yaml=recipe,
        model_dir=merged.output,
        dataset_dir=dataset_dir,
        run_dir=run_dir,
        **ws(cfg),
    )
    _retried(_on_cluster(evaluated, cfg, hub=True)).set_display_name("evaluate")
    if not needs_hub(cfg.eval.lm_eval_tasks):
        _hub_off(evaluated)  # registered lm-eval tasks read their datasets from the hub
    if gpu:
        _on_gpu_pool(evaluated, cfg)
        if cfg.eval.engine == "vllm":  # vLLM pins its own torch: an image of its own
            evaluated.set_container_image(cfg.kubernetes.eval_image)
    return merged, evaluated


def check_cluster(cfg: RunConfig) -> None:
    """What a cluster pipeline cannot run, refused when it is compiled rather than after
    training (run --local evaluates on whatever this machine has)."""
    if cfg.eval.engine == "vllm" and not uses_gpu(cfg):
        raise UserError(
            "eval.engine=vllm generates on the GPU nodes: set hardware.gpu (and the node pool), "
            "or use eval.engine=hf"
        )


def build_pipeline(cfg: RunConfig, workspace: Optional[str] = None):  # noqa: UP045
    """The pipeline of one recipe; `workspace` overrides where the run folders go (a local
    folder for `kubetune run --local`, the PVC mount path on a cluster)."""
    cfg = local_copy(cfg, workspace)
    deploy = cfg.serve.enabled and workspace is None  # a local run has no cluster to serve on
    recipe_text = recipe_parameter(cfg)
    d = {name: field_value(cfg, dotted) for dotted, name, _ in PIPELINE_FIELDS}
    gpu = uses_gpu(cfg)

    @dsl.pipeline(
        name=PIPELINE_NAME,
        description=f"Fine-tune {cfg.model.name_or_path} ({cfg.method}) with kubetune: prepare, "
        "train (PyTorchJob), merge, evaluate, push to S3 when the quality gate passes.",
        pipeline_config=pipeline_config(cfg),
    )
    def finetune(
        recipe_yaml: str = recipe_text,
        overrides: list = [],  # noqa: B006 (KFP reads the default; KEY=VALUE strings)
        workspace: str = workspace or cfg.kubernetes.workspace_mount,
        model_name_or_path: str = d["model_name_or_path"],
        data_path: str = d["data_path"],
        data_format: str = d["data_format"],
        data_max_seq_len: int = d["data_max_seq_len"],
        method: str = d["method"],
        lora_r: int = d["lora_r"],
        lora_alpha: float = d["lora_alpha"],
        train_epochs: float = d["train_epochs"],
        train_lr: float = d["train_lr"],
        train_micro_batch_size: str = d["train_micro_batch_size"],
        train_grad_accum: int = d["train_grad_accum"],
        distributed_nodes: int = d["distributed_nodes"],
        distributed_procs_per_node: int = d["distributed_procs_per_node"],
        distributed_backend: str = d["distributed_backend"],
        eval_num_prompts: int = d["eval_num_prompts"],
        output_uri: str = d["output_uri"],
    ) -> str:
        resolved = resolve_recipe(
            recipe_yaml=recipe_yaml,
            overrides=overrides,
            workspace=ws(cfg).get("workspace", workspace),
            run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
            model_name_or_path=model_name_or_path,
            data_path=data_path,
            data_format=data_format,
            data_max_seq_len=data_max_seq_len,
            method=method,
            lora_r=lora_r,
            lora_alpha=lora_alpha,
            train_epochs=train_epochs,
            train_lr=train_lr,
            train_micro_batch_size=train_micro_batch_size,
            train_grad_accum=train_grad_accum,
            distributed_nodes=distributed_nodes,
            distributed_procs_per_node=distributed_procs_per_node,
            distributed_backend=distributed_backend,
            eval_num_prompts=eval_num_prompts,
            output_uri=output_uri,
        ).set_display_name("resolve recipe")
        run_dir, recipe, prepared = fetch_and_prepare(cfg, resolved)
        merged, evaluated = train_merge_evaluate(
            cfg, recipe, prepared.outputs["Output"], run_dir, gpu
        )

        gate = quality_gate(eval_dir=evaluated.outputs["Output"], **ws(cfg))
        gate.set_display_name("quality gate")
        _on_cluster(gate, cfg, s3=False)
        with dsl.If(gate.output == True, name="gate-passed"):  # noqa: E712
            pushed = push_model(
                recipe_yaml=recipe,
                model_dir=merged.output,
                eval_dir=evaluated.outputs["Output"],
                **ws(cfg),
            )
            _retried(_on_cluster(pushed, cfg).set_caching_options(False))
            pushed.set_display_name("push")
            if deploy:  # serve it with KServe, ask it one question
                deployed = deploy_model(recipe_yaml=recipe, **ws(cfg)).after(pushed)
                _on_cluster(deployed, cfg, s3=False).set_caching_options(False)
                deployed.set_display_name("deploy")
        return evaluated.outputs["Output"]

    return finetune


def compile_pipeline(cfg: RunConfig, path: str) -> None:
    from kfp import compiler

    check_cluster(cfg)
    compiler.Compiler().compile(build_pipeline(cfg), package_path=path)
