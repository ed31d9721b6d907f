"""The recipe's cluster sections: `kubernetes` (namespace, images, node pool, workspace volume,
Secrets, Kueue) and `serve` (KServe). config.py assembles them into RunConfig."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from . import k8s_values
from .config_sections import Section


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
    cpu: str = Field("4", description="CPU request and limit per replica.")
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
    queue_pickup_seconds: int = Field(
        120,
        gt=0,
        description="How long the launcher waits for Kueue to create the queued job's Workload "
        "before it says Kueue does not manage this kind of job (its integration is off: Kueue "
        "v0.19+ no longer enables kubeflow.org/pytorchjob by default) and deletes the job.",
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

    termination_grace_seconds: int | Literal["auto"] = Field(
        "auto",
        description="terminationGracePeriodSeconds of the training pods: the time a drained or "
        "preempted pod has after SIGTERM to finish its step and save a checkpoint. auto: the "
        "plan's step time plus its checkpoint's save time, doubled, plus a minute.",
    )
    stall_minutes: float | None = Field(
        60.0,
        gt=0,
        description="The launcher reports the job stalled when rank 0's log has printed no line "
        "for this long while it runs (None: never).",
    )
    delete_stalled: bool = Field(
        False,
        description="Delete a stalled job (kubernetes.stall_minutes) and fail the step, "
        "instead of reporting it and watching on.",
    )

    @field_validator("termination_grace_seconds", mode="before")
    @classmethod
    def _grace(cls, value: Any) -> Any:
        whole = isinstance(value, int) and not isinstance(value, bool) and value > 0
        if value != "auto" and not whole:
            raise ValueError(
                f"kubernetes.termination_grace_seconds must be a whole number > 0 or auto, got "
                f"{value!r}"
            )
        return value

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
