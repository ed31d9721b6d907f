"""The run config: one typed model that a recipe YAML fills, validated on load.

Every field is documented once, here. `load_recipe(path, overrides)` reads a recipe, applies
`--set key=value` overrides and validates; any problem is a `UserError` that names the key and,
for recipe values, the file and line (`recipe.yaml:12: data.max_seq_len must be > 0, got -5`).
The resolved config is written next to every output (`write_resolved`).
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from . import k8s_values
from .artifacts import RECIPE_FILE
from .errors import UserError

RECIPES_DIR = Path(__file__).resolve().parent.parent / "pipelines" / "recipes"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    name_or_path: str = Field(
        description="Hub id (tiiuae/falcon-7b), local folder, s3:// URI, or tiny://ARCH "
        "(falcon, falcon-40b, llama, mistral, qwen2) for a tiny model built locally."
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    local_dir: str | None = Field(
        None,
        description="A fetched copy of the model (WORKSPACE/models/NAME@REVISION, written by "
        "`kubetune fetch-model` and the pipeline's fetch step): every step loads from it, with "
        "the hub off.",
    )
    commit: str | None = Field(
        None,
        description="The fetched copy's commit (hub) or listing digest (s3), set with local_dir.",
    )
    trust_remote_code: bool = Field(
        False, description="Run the model repo's own code. Off unless you trust it."
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto",
        description="Weights dtype for training/merge; auto = bf16 where the hardware has it.",
    )
    attn_implementation: Literal[
        "auto", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention", "eager"
    ] = Field(
        "auto",
        description="auto = flash-attention 3 on Hopper when installed, else flash-attention "
        "2 when installed on CUDA (packed rows as varlen); else on CUDA flex_attention with "
        "a document mask for packed rows; else SDPA.",
    )


class DataConfig(Section):
    path: str = Field(
        description="JSON/JSONL/CSV/Parquet file or folder, saved HF dataset folder, "
        "s3:// URI, hub dataset id, or sample://NAME for data shipped with kubetune."
    )
    format: Literal["alpaca", "dolly", "samsum", "chat", "template"] = Field(
        description="alpaca: instruction/input/output; dolly: instruction/context/response; "
        "samsum: dialogue/summary; chat: messages[{role, content}]; template: data.template."
    )
    template: str | None = Field(
        None, description="format=template: the prompt, with {field} names."
    )
    response_field: str = Field(
        "response", description="format=template: the field holding the answer."
    )
    split: str = Field(
        "train", description="Split to read from a hub dataset or a saved DatasetDict."
    )
    max_seq_len: int = Field(
        512, gt=0, description="Tokens per training row (prompt + response + EOS)."
    )
    overlength: Literal["truncate", "drop"] = Field(
        "truncate",
        description="Rows longer than max_seq_len: truncate keeps the first max_seq_len "
        "tokens (the response's tail and EOS are cut; rows left with no response token are "
        "dropped); drop removes them. Both are counted in stats.json.",
    )
    packing: bool = Field(
        False,
        description="Pack examples into max_seq_len rows (best-fit "
        "decreasing); position ids restart at each example.",
    )
    eval_fraction: float = Field(
        0.05, ge=0.0, lt=1.0, description="Share of rows held out for eval."
    )
    seed: int = Field(42, description="Seed of the train/eval split.")
    on_bad_row: Literal["error", "drop"] = Field(
        "error",
        description="A row with a missing/null/ill-typed field: stop with an error naming "
        "the row, or drop it and count it in stats.json.",
    )
    max_rows: int | None = Field(
        None, gt=0, description="Read at most this many rows (smoke tests)."
    )
    num_proc: int | None = Field(
        None,
        gt=0,
        description="Processes that render and tokenize records (default: the CPUs this "
        "process may use, a pod's CPU limit included). The output is the same for any value.",
    )


class QuantConfig(Section):
    bits: Literal[4, 8] = Field(4, description="qlora: 4-bit NF4 or 8-bit (bitsandbytes).")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type.")
    double_quant: bool = Field(True, description="Quantize the quantization constants too.")
    compute_dtype: Literal["bfloat16", "float16", "float32"] = Field(
        "bfloat16", description="Matmul dtype of 4-bit layers."
    )


class LoraConfig(Section):
    r: int = Field(16, gt=0, description="LoRA rank.")
    alpha: float = Field(32, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: Literal["auto", "all-linear"] | list[str] = Field(
        "auto",
        description="auto: the architecture's attention and MLP projections; all-linear; "
        "or a list of module names.",
    )
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases to train.")
    use_rslora: bool = Field(False, description="Rank-stabilised scaling alpha / sqrt(r).")


ADAPTER_METHODS = ("adapter", "adapter_v2")  # LLaMA-Adapter and v2 (train/llama_adapter.py)


class AdapterConfig(Section):
    """method=adapter / adapter_v2: LLaMA-Adapter's learned prompts (see llama_adapter.py)."""

    prompt_length: int = Field(10, gt=0, description="Learned prompt vectors per adapted layer.")
    start_layer: int = Field(
        2, ge=0, description="The first decoder layer (0-based) that gets a prompt and a gate."
    )


class FlopCounterConfig(Section):
    start_step: int = Field(
        3,
        gt=0,
        description="The optimizer step whose FLOPs torch.utils.flop_counter counts (after the "
        "first steps' compiles); the step after it is timed for TFLOP/s.",
    )


class ProfileConfig(Section):
    wait: int = Field(1, ge=0, description="Steps skipped before the profiler starts.")
    warmup: int = Field(2, ge=0, description="Steps traced but discarded (profiler warm-up).")
    active: int = Field(3, gt=0, description="Steps recorded into the trace.")


class TrainConfig(Section):
    max_steps: int | None = Field(
        None, gt=0, description="Optimizer steps; overrides epochs when set."
    )
    epochs: float = Field(
        1.0, gt=0, description="Passes over the train split (when max_steps is unset)."
    )
    micro_batch_size: int | Literal["auto"] = Field(
        1,
        description="Rows per process per forward pass; auto: the largest micro batch that "
        "`kubetune plan` says fits the GPU (hardware.gpu, else the device's own memory), "
        "grad_accum then derived from train.global_batch_size when it is set. The choice is "
        "recorded in metrics.json (`micro_batch`).",
    )
    grad_accum: int = Field(1, gt=0, description="Micro batches per optimizer step.")
    global_batch_size: int | None = Field(
        None,
        gt=0,
        description="Rows per optimizer step over all processes. With micro_batch_size auto, "
        "grad_accum = global_batch_size / (micro batch x processes); with a fixed micro batch "
        "it must equal micro_batch_size x grad_accum x processes.",
    )
    lr: float = Field(2e-4, gt=0, description="Peak learning rate.")
    lr_scheduler: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="Schedule after warmup."
    )
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    gradient_checkpointing: bool | Literal["auto"] = Field(
        "auto",
        description="Recompute activations in backward. auto: off when the plan says the run "
        "fits the GPU's memory with a 10% margin, else only as many decoder layers as needed "
        "to fit (recorded in metrics.json with the reason); true: every layer; false: none.",
    )
    save_steps: int = Field(100, gt=0, description="Checkpoint every N optimizer steps.")
    eval_steps: int | None = Field(
        None, gt=0, description="Eval loss every N steps (None: at the end)."
    )
    logging_steps: int = Field(10, gt=0, description="Log loss every N steps.")
    seed: int = Field(42, description="Seed of init, dropout and data order.")

    @field_validator("micro_batch_size", mode="before")
    @classmethod
    def _micro_batch(cls, value: Any) -> Any:
        if value == "auto":
            return value
        whole = not isinstance(value, bool) and isinstance(value, int | str)
        if not (whole and str(value).strip().isdigit() and int(value) > 0):
            raise ValueError(f"train.micro_batch_size must be > 0 or auto, got {value!r}")
        return int(value)

    @field_validator("gradient_checkpointing", "compile", mode="before")
    @classmethod
    def _switch(cls, value: Any, info: ValidationInfo) -> Any:
        if value == "auto" or isinstance(value, bool):
            return value
        raise ValueError(f"train.{info.field_name} must be true, false or auto, got {value!r}")

    kernels: Literal["auto", "liger", "none"] = Field(
        "auto",
        description="auto: Liger-Kernel's RMSNorm/RoPE/SwiGLU/fused linear cross-entropy where "
        "installed on CUDA for Llama/Mistral/Qwen2, else kubetune's chunked linear + "
        "cross-entropy (never the full logits); liger: Liger or an error; none: "
        "transformers' own forward.",
    )
    compile: bool | Literal["auto"] = Field(
        "auto",
        description="torch.compile each decoder layer. auto: on CUDA with ddp or fsdp and "
        "static batch shapes (packed rows); a layer that fails to compile runs eagerly with "
        "one log line. true: everywhere (CPU too); false: never.",
    )
    freeze_layers: int = Field(
        0,
        ge=0,
        description="method=full: freeze the input embeddings and the first N decoder layers, "
        "and train the rest (llama-recipes' num_freeze_layers).",
    )
    flop_counter: FlopCounterConfig | None = Field(
        None,
        description="Count one step's FLOPs with torch.utils.flop_counter; metrics.json gets "
        "measured FLOPs per token, TFLOP/s and MFU beside the analytic estimate.",
    )
    profile: ProfileConfig | None = Field(
        None,
        description="PyTorch profiler traces (wait/warmup/active steps) into OUTPUT/tensorboard/ "
        "(TensorBoard's profiler plugin, or chrome://tracing).",
    )


class FsdpConfig(Section):
    sharding: Literal["full", "shard_grad_op", "no_shard", "hybrid"] = Field(
        "full",
        description="full: weights, gradients and optimizer state sharded over every process, "
        "weights gathered per layer (ZeRO-3); shard_grad_op: weights stay gathered from forward "
        "to backward (ZeRO-2, fewer all-gathers); no_shard: a replica per process (DDP); hybrid: "
        "shard inside a node, replicate across nodes (HSDP).",
    )
    cpu_offload: bool = Field(
        False,
        description="Keep sharded weights, gradients and optimizer state in CPU memory; the "
        "optimizer steps on the CPU (FSDP2 CPUOffloadPolicy).",
    )


class DistributedConfig(Section):
    strategy: Literal["ddp", "fsdp", "deepspeed"] = Field(
        "ddp", description="ddp: a replica per GPU; fsdp; deepspeed ZeRO."
    )
    nodes: int = Field(1, gt=0, description="Machines (PyTorchJob Master + nodes-1 Workers).")
    procs_per_node: int = Field(1, gt=0, description="Processes per node, one per GPU.")
    backend: Literal["local", "pytorchjob", "trainjob"] = Field(
        "local",
        description="local: torchrun here; pytorchjob: a PyTorchJob (Kubeflow Training "
        "Operator v1); trainjob: a TrainJob (Kubeflow Trainer v2) over kubernetes.runtime.",
    )
    zero_stage: Literal[2, 3] = Field(3, description="deepspeed: ZeRO stage.")
    offload: Literal["none", "optimizer", "optimizer+params"] = Field(
        "none", description="deepspeed: CPU offload."
    )
    fsdp: FsdpConfig = Field(default_factory=FsdpConfig)
    low_memory_load: bool = Field(
        True,
        description="fsdp with lora/full: only rank 0 reads the checkpoint; the other ranks "
        "build on the meta device and receive their shards (llama-recipes' low_cpu_fsdp).",
    )


class HardwareConfig(Section):
    gpu: str = Field(
        "none",
        description="GPU the plan is checked against (A100-80GB, H100-80GB, A10G-24GB, none).",
    )
    gpu_memory_gb: float | None = Field(None, gt=0, description="Override the GPU memory of `gpu`.")


class EvalConfig(Section):
    num_prompts: int = Field(32, gt=0, description="Held-out prompts to generate answers for.")
    max_new_tokens: int = Field(64, gt=0, description="Tokens generated per prompt.")
    batch_size: int = Field(8, gt=0, description="Prompts per generate() call.")
    do_sample: bool = Field(False, description="Sample instead of greedy decoding.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature (do_sample only).")
    engine: Literal["hf", "vllm"] = Field(
        "hf",
        description="What generates the answers: hf (transformers' generate, CPU or GPU) or "
        "vllm (vLLM on the GPU nodes, in kubernetes.eval_image; far faster for many prompts).",
    )
    min_rouge_l: float | None = Field(None, ge=0, le=1, description="Push only if ROUGE-L >= this.")
    max_eval_loss: float | None = Field(None, gt=0, description="Push only if eval loss <= this.")
    lm_eval_tasks: list[str] = Field(
        default_factory=list,
        description="lm-evaluation-harness tasks scored on base and tuned: registered task or "
        "group names (their datasets come from the hub), or paths to task YAML files (their "
        "data files relative to the YAML; these work offline).",
    )
    lm_eval_limit: int | None = Field(
        None, gt=0, description="Score at most this many documents per lm-eval task (all: unset)."
    )
    lm_eval_num_fewshot: int | None = Field(
        None, ge=0, description="Few-shot examples per lm-eval prompt (unset: the task's own)."
    )
    max_regression: float | None = Field(
        None,
        ge=0,
        description="Push only if no lm-eval task's score falls below the base model's by more "
        "than this, on the metric's own scale (0.02: two accuracy points).",
    )

    @field_validator("lm_eval_tasks")
    @classmethod
    def _tasks(cls, value: list[str]) -> list[str]:
        for i, task in enumerate(value):
            if not task.strip():
                raise ValueError(f"eval.lm_eval_tasks[{i}] is empty")
        if len(set(value)) != len(value):
            raise ValueError("eval.lm_eval_tasks lists a task twice")
        return value

    @model_validator(mode="after")
    def _regression_needs_tasks(self) -> EvalConfig:
        if self.max_regression is not None and not self.lm_eval_tasks:
            raise ValueError("eval.max_regression needs eval.lm_eval_tasks (the tasks it guards)")
        return self


class RegistryConfig(Section):
    """Kubeflow Model Registry: the push step registers the pushed model there."""

    server: str = Field(
        description="The registry's REST address, http(s)://HOST[:PORT] (in-cluster e.g. "
        "https://model-registry-service.kubeflow.svc.cluster.local:8443)."
    )
    model_name: str = Field(description="The registered model; each run adds a version.")
    author: str = Field(description="Author (and owner) recorded on the model and its versions.")

    @field_validator("server")
    @classmethod
    def _server(cls, value: str) -> str:
        if not re.match(r"^https?://[^/\s]+$", value.rstrip("/")):
            raise ValueError(
                f"output.model_registry.server must be http(s)://HOST[:PORT], got {value!r}"
            )
        return value.rstrip("/")

    @field_validator("model_name", "author")
    @classmethod
    def _not_blank(cls, value: str, info: ValidationInfo) -> str:
        if not value.strip():
            raise ValueError(f"output.model_registry.{info.field_name} must not be empty")
        return value


class OutputConfig(Section):
    uri: str = Field(
        "./kubetune-output",
        description="Where the finished model is pushed: s3://bucket/prefix or a folder.",
    )
    model_registry: RegistryConfig | None = Field(
        None,
        description="Register the pushed model (a version per run, its S3 artifact, metrics and "
        "gate verdict) in Kubeflow Model Registry.",
    )


def quantity_field(value: Any, key: str) -> str:
    """A Kubernetes quantity field (`cpu: 8` in YAML is a number; the API takes it as "8")."""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ValueError(f"{key} must be a quantity, got {value!r}")
    return k8s_values.quantity(str(value), key, allow_zero=False)


def object_name_field(value: str | None, key: str) -> str | None:
    """An optional Kubernetes object name (Secret, ServiceAccount, PVC, ...)."""
    return None if value is None else k8s_values.dns_subdomain(value, key)


class ServeConfig(Section):
    """Serving the pushed model with KServe (`kubetune render-serve`, `kubetune deploy`)."""

    enabled: bool = Field(
        False,
        description="The pipeline's deploy step: after the gate and the push, apply the "
        "InferenceService, wait until it is Ready, ask it one question.",
    )
    ready_timeout_seconds: int = Field(
        1800, gt=0, description="How long deploy waits for the InferenceService to be Ready."
    )
    prompt: str = Field(
        "Summarize in one sentence what you were fine-tuned to do.",
        min_length=1,
        description="The one chat question deploy asks the served model.",
    )
    name: str | None = Field(
        None,
        description="InferenceService name (DNS-1035 label); default kt-MODEL-METHOD from the "
        "recipe.",
    )
    backend: Literal["auto", "vllm", "huggingface"] = Field(
        "auto",
        description="KServe Hugging Face runtime's backend: vllm (GPU), huggingface "
        "(transformers; also CPU); auto: vllm with GPUs, huggingface without.",
    )
    service_account: str = Field(
        "kubetune-serve",
        description="ServiceAccount of the predictor: KServe's storage initializer reads the S3 "
        "credentials from the Secret it lists (manifests/serving/).",
    )
    runtime: str | None = Field(
        None,
        description="ServingRuntime name; unset: KServe picks the one for modelFormat "
        "huggingface (kserve-huggingfaceserver).",
    )
    gpus: int | None = Field(
        None, ge=0, description="GPUs per replica; unset: kubetune plan's inference estimate."
    )
    memory: str | None = Field(
        None, description="Memory per replica; unset: kubetune plan's inference estimate."
    )
    cpu: str = Field("4", description="CPU request per replica.")
    max_model_len: int | None = Field(
        None, gt=0, description="vLLM's --max-model-len; unset: the model's own."
    )
    min_replicas: int = Field(1, ge=0, description="Fewest replicas (0: scale to zero).")
    max_replicas: int = Field(1, ge=1, description="Most replicas.")

    @field_validator("memory", "cpu", mode="before")
    @classmethod
    def _quantity(cls, value: Any, info: ValidationInfo) -> str | None:
        return None if value is None else quantity_field(value, f"serve.{info.field_name}")

    @field_validator("service_account", "runtime")
    @classmethod
    def _object_name(cls, value: str | None, info: ValidationInfo) -> str | None:
        return object_name_field(value, f"serve.{info.field_name}")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        return None if value is None else k8s_values.dns_1035_label(value, "serve.name")

    @model_validator(mode="after")
    def _replicas(self) -> ServeConfig:
        if self.max_replicas < self.min_replicas:
            raise ValueError(
                f"serve.max_replicas={self.max_replicas} is less than "
                f"serve.min_replicas={self.min_replicas}"
            )
        return self


DEFAULT_WORKSPACE = "/workspace"
KFP_WORKSPACE = "/kfp-workspace"  # kfp.dsl.constants.WORKSPACE_MOUNT_PATH


class KubernetesConfig(Section):
    namespace: str = Field("kubeflow", description="Namespace of the PyTorchJob or TrainJob.")
    trainer_image: str = Field(
        "ghcr.io/kubetune/trainer:0.1.0", description="CUDA image of the worker."
    )
    steps_image: str = Field(
        "ghcr.io/kubetune/steps:0.1.0", description="CPU image of the other steps."
    )
    eval_image: str = Field(
        "ghcr.io/kubetune/eval:0.1.0",
        description="CUDA image of the evaluate step with eval.engine=vllm (vLLM pins its own "
        "torch, so it is not the trainer image).",
    )
    service_account: str = Field(
        "kubetune-trainer", description="ServiceAccount of the training pods."
    )
    gpu_resource: str = Field("nvidia.com/gpu", description="Extended resource name of a GPU.")
    node_selector: dict[str, str] = Field(
        default_factory=dict, description="Node selector of the GPU node pool."
    )
    tolerations: list[dict[str, Any]] = Field(
        default_factory=list, description="Tolerations of the GPU node pool."
    )
    cpu: str = Field("8", description="CPU request per training pod.")
    memory: str = Field("64Gi", description="Memory request per training pod.")
    shm_size: str = Field("16Gi", description="Size of /dev/shm (memory emptyDir).")
    workspace_pvc: str = Field(
        "kubetune-workspace", description="ReadWriteMany PVC for datasets, cache and outputs."
    )
    s3_secret: str = Field(
        "kubetune-s3", description="Secret with AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY."
    )
    hf_secret: str | None = Field(None, description="Secret with HF_TOKEN for gated models.")
    active_deadline_seconds: int = Field(
        86400, gt=0, description="Hard bound on the job's run time."
    )
    ttl_seconds_after_finished: int = Field(
        3600, ge=0, description="Delete the finished job after this."
    )
    backoff_limit: int = Field(3, ge=0, description="Pod restarts before the job fails.")
    clean_pod_policy: Literal["None", "Running", "All"] = Field(
        "Running", description="Pods deleted when the job ends (Running: keep finished ones' logs)."
    )
    elastic_min_nodes: int | None = Field(
        None, gt=0, description="Elastic training: run on min..distributed.nodes nodes (c10d)."
    )
    elastic_max_restarts: int = Field(3, ge=0, description="Elastic training: restarts allowed.")
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = Field(
        "IfNotPresent", description="imagePullPolicy of the training pods."
    )
    workspace_mount: str = Field(
        DEFAULT_WORKSPACE, description="Where the workspace PVC is mounted in every pod."
    )
    run_as_user: int = Field(1000, gt=0, description="Non-root UID of the pods (the image's user).")
    runtime: str = Field(
        "kubetune-torch-distributed",
        description="backend=trainjob: the Trainer v2 runtime the TrainJob refers to (kubetune "
        "ships manifests/trainer-v2/; `render-job --kind runtime` prints one for the recipe).",
    )
    runtime_kind: Literal["ClusterTrainingRuntime", "TrainingRuntime"] = Field(
        "ClusterTrainingRuntime",
        description="backend=trainjob: a cluster-wide runtime, or one in kubernetes.namespace.",
    )
    queue: str | None = Field(
        None,
        description="Kueue LocalQueue of the job (label kueue.x-k8s.io/queue-name); the job is "
        "created suspended and starts when Kueue admits it.",
    )
    priority_class: str | None = Field(
        None,
        description="Kubernetes PriorityClass of the training pods (priorityClassName; a "
        "PyTorchJob's runPolicy.schedulingPolicy.priorityClass too, where Kueue reads it).",
    )
    workload_priority_class: str | None = Field(
        None,
        description="Kueue WorkloadPriorityClass of the job (label "
        "kueue.x-k8s.io/priority-class): its priority in the queue and for preemption, "
        "without changing the pods' own priority. Needs kubernetes.queue.",
    )
    queue_timeout_seconds: int = Field(
        86400,
        gt=0,
        description="How long the launcher waits for Kueue to admit (or re-admit, after a "
        "preemption) the job before it gives up with an error; the job stays queued.",
    )
    workspace: Literal["pvc", "kfp"] = Field(
        "pvc",
        description="pvc: the existing PVC kubernetes.workspace_pvc; kfp: the KFP run's own "
        "workspace (dsl.WorkspaceConfig, no PVC made beforehand; mounted at /kfp-workspace).",
    )
    workspace_size: str = Field(
        "500Gi", description="workspace=kfp: size of the run's workspace PVC."
    )
    workspace_storage_class: str | None = Field(
        None,
        description="workspace=kfp: storageClassName of the run's workspace PVC (ReadWriteMany; "
        "the cluster's default class when unset).",
    )

    # What the API server would reject is rejected here, naming the recipe key.
    @field_validator("cpu", "memory", "shm_size", "workspace_size", mode="before")
    @classmethod
    def _quantity(cls, value: Any, info: ValidationInfo) -> str:
        return quantity_field(value, f"kubernetes.{info.field_name}")

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, value: str) -> str:
        return k8s_values.dns_label(value, "kubernetes.namespace")

    @field_validator(
        "service_account",
        "workspace_pvc",
        "s3_secret",
        "hf_secret",
        "runtime",
        "priority_class",
        "workload_priority_class",
        "workspace_storage_class",
    )
    @classmethod
    def _object_name(cls, value: str | None, info: ValidationInfo) -> str | None:
        return object_name_field(value, f"kubernetes.{info.field_name}")

    @field_validator("queue")
    @classmethod
    def _queue(cls, value: str | None) -> str | None:
        # a LocalQueue name that is also the value of the queue-name label
        return None if value is None else k8s_values.dns_label(value, "kubernetes.queue")

    @field_validator("gpu_resource")
    @classmethod
    def _gpu_resource(cls, value: str) -> str:
        return k8s_values.extended_resource(value, "kubernetes.gpu_resource")

    @field_validator("node_selector")
    @classmethod
    def _node_selector(cls, value: dict[str, str]) -> dict[str, str]:
        for key, label in value.items():
            k8s_values.qualified_name(key, f"kubernetes.node_selector key {key!r}")
            k8s_values.label_value(label, f"kubernetes.node_selector.{key}")
        return value

    @field_validator("tolerations")
    @classmethod
    def _tolerations(cls, value: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for index, item in enumerate(value):
            k8s_values.toleration(item, f"kubernetes.tolerations[{index}]")
        return value


class RunConfig(Section):
    """The whole typed config of a run; a recipe YAML fills it."""

    model: ModelConfig
    data: DataConfig
    method: Literal["qlora", "lora", "full", "adapter", "adapter_v2"] = Field(
        "lora",
        description="qlora, lora or full fine-tuning; adapter (LLaMA-Adapter) or adapter_v2 "
        "(LLaMA-Adapter v2: adds linear-layer bias/scale and trained norms).",
    )
    quant: QuantConfig = Field(default_factory=QuantConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    adapter: AdapterConfig = Field(default_factory=AdapterConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    hardware: HardwareConfig = Field(default_factory=HardwareConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    kubernetes: KubernetesConfig = Field(default_factory=KubernetesConfig)
    compare: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="kubetune compare: per method, dotted KEY: VALUE settings its branch trains "
        "with (over the published defaults; e.g. adapter: {train.lr: 0.05}).",
    )

    @field_validator("compare")
    @classmethod
    def _compare(cls, value: dict) -> dict:
        from .compare_methods.settings import METHODS, check_key

        for method, settings in value.items():
            if method not in METHODS:
                raise ValueError(f"compare.{method}: not a method ({', '.join(METHODS)})")
            for key in settings or {}:
                try:
                    check_key(key, f"compare.{method}")
                except UserError as exc:
                    raise ValueError(str(exc)) from None
        return value

    @model_validator(mode="after")
    def _consistent(self) -> RunConfig:
        if self.data.format == "template" and not self.data.template:
            raise ValueError("data.template is required when data.format is template")
        if self.distributed.nodes > 1 and self.distributed.backend == "local":
            raise ValueError(
                f"distributed.nodes={self.distributed.nodes} needs "
                "distributed.backend=pytorchjob or trainjob (local runs on one machine)"
            )
        if self.method == "qlora" and self.distributed.strategy == "deepspeed":
            raise ValueError(
                "method=qlora runs with distributed.strategy=ddp (a 4-bit replica per GPU) "
                "or fsdp (the 4-bit base sharded per decoder layer), not deepspeed"
            )
        fsdp = self.distributed.fsdp
        if fsdp != FsdpConfig() and self.distributed.strategy != "fsdp":
            raise ValueError("distributed.fsdp.* needs distributed.strategy=fsdp")
        if fsdp.cpu_offload and self.method == "qlora":
            raise ValueError(
                "distributed.fsdp.cpu_offload: a 4-bit base stays on the GPU (bitsandbytes "
                "quantizes there); offload with method=lora or full"
            )
        if self.train.freeze_layers and self.method != "full":
            raise ValueError(
                "train.freeze_layers needs method=full (the other methods train adapters only)"
            )
        if self.train.flop_counter is not None and self.train.profile is not None:
            raise ValueError(
                "train.flop_counter and train.profile measure each other's overhead: use one "
                "at a time (as llama-recipes does)"
            )
        world = self.distributed.nodes * self.distributed.procs_per_node
        rows = self.train.global_batch_size
        micro = self.train.micro_batch_size
        if rows is not None and rows % world:
            raise ValueError(
                f"train.global_batch_size={rows} is not a multiple of the {world} processes"
            )
        if rows is not None and micro != "auto" and rows != micro * self.train.grad_accum * world:
            raise ValueError(
                f"train.global_batch_size={rows} but micro_batch_size {micro} x grad_accum "
                f"{self.train.grad_accum} x {world} processes = "
                f"{micro * self.train.grad_accum * world}; set one of them, or "
                "micro_batch_size: auto"
            )
        if self.distributed.offload != "none" and self.distributed.strategy != "deepspeed":
            raise ValueError("distributed.offload needs distributed.strategy=deepspeed")
        low = self.kubernetes.elastic_min_nodes
        if low is not None and low > self.distributed.nodes:
            raise ValueError(
                f"kubernetes.elastic_min_nodes={low} is more than distributed.nodes="
                f"{self.distributed.nodes}"
            )
        k8s = self.kubernetes
        if not k8s.workspace_mount.startswith("/"):
            raise ValueError("kubernetes.workspace_mount must be an absolute path")
        if k8s.workload_priority_class and not k8s.queue:
            raise ValueError(
                "kubernetes.workload_priority_class is Kueue's: it needs kubernetes.queue (the "
                "LocalQueue the job is submitted to)"
            )
        if k8s.workspace == "kfp" and k8s.workspace_mount != KFP_WORKSPACE:
            if k8s.workspace_mount != DEFAULT_WORKSPACE:
                raise ValueError(
                    f"kubernetes.workspace=kfp: KFP mounts the run's workspace at "
                    f"{KFP_WORKSPACE}, not kubernetes.workspace_mount={k8s.workspace_mount}"
                )
            k8s.__dict__["workspace_mount"] = KFP_WORKSPACE  # no re-validation loop
        return self


# --- loading ---------------------------------------------------------------------------------


def _key_lines(text: str) -> dict[str, int]:
    """Map dotted keys of a YAML mapping to their 1-based line numbers."""
    lines: dict[str, int] = {}

    def walk(node, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                key = f"{prefix}{key_node.value}"
                lines[key] = key_node.start_mark.line + 1
                walk(value_node, key + ".")

    with contextlib.suppress(yaml.YAMLError):  # the caller reports invalid YAML itself
        walk(yaml.compose(text, Loader=yaml.SafeLoader), "")
    return lines


def _describe(err: dict) -> str:
    """One pydantic error as `key must ..., got X`."""
    key = ".".join(str(p) for p in err["loc"] if not str(p).startswith(("function-", "literal[")))
    kind, ctx, got = err["type"], err.get("ctx", {}), err.get("input")
    bounds = {
        "greater_than": ">",
        "greater_than_equal": ">=",
        "less_than": "<",
        "less_than_equal": "<=",
    }
    if kind in bounds:
        return f"{key} must be {bounds[kind]} {next(iter(ctx.values()))}, got {got!r}"
    if kind == "extra_forbidden":
        return f"{key}: unknown key"
    if kind == "missing":
        return f"{key}: required key is missing"
    if kind == "literal_error":
        return f"{key} must be one of {ctx.get('expected')}, got {got!r}"
    if kind == "value_error":
        return str(ctx.get("error", err["msg"]))
    return f"{key}: {err['msg'].lower()}, got {got!r}"


def _error_key(err: dict) -> str:
    return ".".join(str(p) for p in err["loc"] if not str(p).startswith(("function-", "literal[")))


def parse_override(item: str) -> tuple[str, Any]:
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise UserError(f"--set {item}: expected key=value (e.g. data.max_seq_len=1024)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    # `--set data.template=Q: {question}` means the string, not a YAML mapping; lists and
    # mappings must be written in flow style ([a, b], {k: v}).
    if isinstance(value, dict | list) and not raw.lstrip().startswith(("[", "{")):
        value = raw
    return key.strip(), value


def apply_override(raw: dict, key: str, value: Any) -> None:
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UserError(f"--set {key}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def resolve_recipe_path(recipe: str | Path) -> Path:
    """A path, or the bare name of a shipped recipe (`tiny-demo`)."""
    path = Path(recipe)
    if path.is_file():
        return path
    shipped = RECIPES_DIR / f"{Path(recipe).stem}.yaml"
    if not path.suffix and shipped.is_file():
        return shipped
    raise UserError(f"{recipe}: no such recipe file")


def load_recipe(recipe: str | Path, overrides: list[str] = ()) -> RunConfig:
    """Read a recipe file (or a shipped recipe's name), apply overrides, validate."""
    path = resolve_recipe_path(recipe)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text ({exc.reason})") from None
    return parse_recipe(text, str(path), overrides)


def parse_recipe(text: str, origin: str = "recipe", overrides: list[str] = ()) -> RunConfig:
    """Validate recipe YAML text; `origin` names it in errors (a file path, or "recipe")."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise UserError(f"{origin}{line}: invalid YAML ({getattr(exc, 'problem', exc)})") from None
    if raw is None:
        raise UserError(f"{origin}: the recipe is empty")
    if not isinstance(raw, dict):
        raise UserError(
            f"{origin}: a recipe is a YAML mapping of sections, got {type(raw).__name__}"
        )
    overridden: dict[str, str] = {}
    for item in overrides:
        key, value = parse_override(item)
        apply_override(raw, key, value)
        overridden[key] = item
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:
        lines = _key_lines(text)
        messages = []
        for err in exc.errors():
            key = _error_key(err)
            where = next(
                (
                    f"--set {overridden[k]}"
                    for k in overridden
                    if key == k or key.startswith(k + ".")
                ),
                None,
            )
            if where is None:
                line = lines.get(key) or lines.get(key.rsplit(".", 1)[0])
                where = f"{origin}:{line}" if line else origin
            messages.append(f"{where}: {_describe(err)}")
        raise UserError("\n".join(messages)) from None


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def write_resolved(cfg: RunConfig, out_dir: Path) -> Path:
    """Write the resolved config beside an output, as litgpt writes hyper_parameters.yaml."""
    target = Path(out_dir) / RECIPE_FILE
    target.write_text(dump_config(cfg), encoding="utf-8")
    return target
