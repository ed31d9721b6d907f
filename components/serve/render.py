"""The KServe `InferenceService` (serving.kserve.io/v1beta1) that serves a pushed model.

KServe's Hugging Face runtime (`modelFormat: huggingface`, the `kserve-huggingfaceserver`
ServingRuntime) with its vLLM backend on GPUs, or its transformers backend without; its storage
initializer copies `storageUri` (the pushed prefix: safetensors, config, tokenizer) into the
pod, with the S3 credentials of the predictor's ServiceAccount (`serve.service_account`). GPUs
and memory come from `kubetune plan`'s inference estimate unless the recipe sets them; the node
pool's selector and tolerations are the recipe's. The server speaks the OpenAI API
(`/openai/v1/chat/completions`, model name = the InferenceService's).
"""

from __future__ import annotations

import re

from ..backends.pod import labels
from ..config import RunConfig
from ..errors import UserError
from ..k8s_values import dns_1035_label, quantity_value

API_VERSION = "serving.kserve.io/v1beta1"
KIND = "InferenceService"
GROUP, VERSION, PLURAL = "serving.kserve.io", "v1beta1", "inferenceservices"
STORAGE = re.compile(r"^(s3|gs|pvc|hf|https?)://[^/]+")  # what KServe's storage initializer reads


def default_name(cfg: RunConfig) -> str:
    model = cfg.model.name_or_path.rstrip("/").split("/")[-1].lower()
    slug = re.sub(r"[^a-z0-9-]+", "-", f"kt-{model}-{cfg.method}").strip("-")
    return re.sub(r"-+", "-", slug)[:53].rstrip("-")


def backend(cfg: RunConfig) -> str:
    if cfg.serve.backend != "auto":
        return cfg.serve.backend
    return "vllm" if cfg.hardware.uses_gpu else "huggingface"


def check_uri(uri: str, where: str) -> None:
    if not STORAGE.match(uri):
        raise UserError(
            f"{where} {uri}: KServe's storage initializer reads s3://, gs://, pvc://, hf:// or "
            "http(s):// URIs; give the pushed prefix, e.g. s3://bucket/models/NAME"
        )


def served_resources(cfg: RunConfig) -> tuple[int, str, str]:
    """(GPUs, memory, the plan's reason) of one replica: kubetune plan's inference estimate
    unless the recipe sets them, refused where the model would not fit or vLLM has no GPU."""
    from ..planner.architecture import architecture
    from ..planner.plan import GB, MAX_SERVE_GPUS, gpu_memory_bytes, gpus_needed, inference_plan

    serve = cfg.serve
    gpu_bytes = gpu_memory_bytes(cfg)  # an unknown GPU type is refused, as `plan` does
    arch = architecture(cfg)
    plan = inference_plan(cfg, arch)
    gpus = plan.gpus if serve.gpus is None else serve.gpus
    if gpus > MAX_SERVE_GPUS:
        raise UserError(
            f"serving {cfg.model.name_or_path} needs {gpus} GPUs ({plan.reason}); one replica is "
            f"one pod, at most {MAX_SERVE_GPUS}: use larger GPUs (hardware.gpu) or set serve.gpus"
        )
    weights_gb = arch.total_params * 2 / GB
    if gpus and gpu_bytes and gpus < (need := gpus_needed(arch.total_params, gpu_bytes / GB)):
        raise UserError(
            f"serve.gpus={gpus}: {cfg.model.name_or_path}'s {weights_gb:.1f} GB of bf16 weights "
            f"and its KV cache need at least {need} x {cfg.hardware.gpu}; leave serve.gpus "
            f"unset (kubetune plan's choice: {plan.gpus}) or give more"
        )
    if backend(cfg) == "vllm" and gpus == 0:
        raise UserError(
            "serve.backend=vllm needs GPUs: set hardware.gpu (or serve.gpus), or "
            "serve.backend=huggingface"
        )
    memory = serve.memory or plan.memory
    if gpus == 0 and quantity_value(memory) < arch.total_params * 2:
        raise UserError(
            f"serve.memory={memory}: serving on CPUs holds {cfg.model.name_or_path}'s "
            f"{weights_gb:.1f} GB of bf16 weights in memory; leave serve.memory unset "
            f"({plan.memory}) or give more"
        )
    return gpus, memory, plan.reason


def predictor_spec(cfg: RunConfig, uri: str, name: str, gpus: int, memory: str) -> dict:
    """The predictor: the Hugging Face runtime's model with its resources, on the GPU pool."""
    serve, k8s, engine = cfg.serve, cfg.kubernetes, backend(cfg)
    # every limit set, each equal to its request: KServe merges the predictor's resources with
    # the ServingRuntime's key by key, and the stock runtime's limits.cpu "1" would otherwise
    # stay below serve.cpu (a pod the API server refuses)
    requests = {"cpu": serve.cpu, "memory": memory}
    limits = {"cpu": serve.cpu, "memory": memory}
    if gpus:
        requests[k8s.gpu_resource] = str(gpus)
        limits[k8s.gpu_resource] = str(gpus)
    args = [f"--model_name={name}", f"--backend={engine}"]
    if engine == "vllm":
        args += ["--dtype=bfloat16", f"--tensor-parallel-size={gpus}"]
        if serve.max_model_len:
            args.append(f"--max-model-len={serve.max_model_len}")
    model: dict = {
        "modelFormat": {"name": "huggingface"},
        "storageUri": uri.rstrip("/"),
        "args": args,
        "resources": {"requests": requests, "limits": limits},
    }
    if serve.runtime:
        model["runtime"] = serve.runtime
    predictor: dict = {
        "minReplicas": serve.min_replicas,
        "maxReplicas": serve.max_replicas,
        "serviceAccountName": serve.service_account,
        "model": model,
    }
    if gpus and k8s.node_selector:
        predictor["nodeSelector"] = dict(k8s.node_selector)
    if gpus and k8s.tolerations:
        predictor["tolerations"] = [dict(t) for t in k8s.tolerations]
    return predictor


def render_inference_service(
    cfg: RunConfig, uri: str, name: str | None = None, where: str = "--uri"
) -> dict:
    """The InferenceService for the model pushed to `uri` (`where`: the flag or recipe key it
    came from), as a dict. What would only fail once the predictor starts is refused here: a
    URI KServe cannot read, an unknown GPU type, too few GPUs or too little memory to hold the
    model, vLLM without GPUs."""
    check_uri(uri, where)
    name = name or cfg.serve.name or default_name(cfg)
    try:
        dns_1035_label(name, "--name")
    except ValueError as exc:
        raise UserError(str(exc)) from None
    gpus, memory, reason = served_resources(cfg)
    meta_labels = labels(name)
    meta_labels["app.kubernetes.io/component"] = "server"
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {
            "name": name,
            "namespace": cfg.kubernetes.namespace,
            "labels": meta_labels,
            "annotations": {
                "kubetune.io/base-model": cfg.model.name_or_path,
                "kubetune.io/method": cfg.method,
                "kubetune.io/plan": reason,
            },
        },
        "spec": {"predictor": predictor_spec(cfg, uri, name, gpus, memory)},
    }
