"""KServe's InferenceService API: the `kserve` SDK's own models (PyPI `kserve`, pinned in
pyproject.toml's dev extra; a round trip through them must lose no field) and the rules KServe
documents and its webhook enforces (https://kserve.github.io/website/docs/...: one model per
predictor, a model format, a storage URI KServe's storage initializer reads, replicas, a DNS-1035
name), plus the pod KServe would make from the predictor against the Kubernetes core schema."""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import re
import types

from .k8s_schemas import _lost, pod_template_errors

KSERVE_VERSION = "0.21.0"
FRAMEWORKS = (
    "sklearn", "xgboost", "tensorflow", "pytorch", "triton", "onnx", "huggingface", "pmml",
    "lightgbm", "paddle",
)  # fmt: skip
STORAGE = re.compile(r"^(s3|gs|pvc|hf|https?|oci)://[^/]+")


@contextlib.contextmanager
def _models_with_core_types():
    """The SDK's deserializer looks every type up in kserve.models; the core types it uses
    (V1ObjectMeta, V1Toleration, ...) live in kubernetes.client.models."""
    import kserve
    import kubernetes.client

    original = kserve.models
    kserve.models = types.SimpleNamespace(
        **{**vars(kubernetes.client.models), **vars(kserve.models)}
    )
    try:
        yield
    finally:
        kserve.models = original


def kserve_errors(isvc: dict) -> list[str]:
    from kserve import api_client

    assert importlib.metadata.version("kserve") == KSERVE_VERSION
    errors = []
    if (
        isvc.get("apiVersion") != "serving.kserve.io/v1beta1"
        or isvc.get("kind") != "InferenceService"
    ):
        errors.append("apiVersion/kind must be serving.kserve.io/v1beta1 InferenceService")

    class Response:
        data = json.dumps(isvc)

    with _models_with_core_types():
        client = api_client.ApiClient()
        back = client.sanitize_for_serialization(
            client.deserialize(Response(), "V1beta1InferenceService")
        )
    # the SDK holds quantities as strings, as kubetune writes them
    errors += _lost(isvc, back, "")
    name = isvc["metadata"]["name"]
    if not re.match(r"^[a-z]([-a-z0-9]*[a-z0-9])?$", name) or len(name) > 53:
        errors.append(f"metadata.name {name!r}: a DNS-1035 label of at most 53 characters")
    predictor = isvc["spec"]["predictor"]
    given = [k for k in (*FRAMEWORKS, "model") if k in predictor]
    if len(given) + bool(predictor.get("containers")) != 1:
        errors.append(f"predictor: exactly one model (or framework, or containers), got {given}")
    model = predictor.get("model", {})
    if not model.get("modelFormat", {}).get("name"):
        errors.append("predictor.model.modelFormat.name is required")
    if not STORAGE.match(model.get("storageUri", "")):
        errors.append(f"predictor.model.storageUri {model.get('storageUri')!r}: not a storage URI")
    low, high = predictor.get("minReplicas", 1), predictor.get("maxReplicas", 0)
    if low < 0 or (high and high < low):
        errors.append(f"replicas: min {low}, max {high}")
    resources = model.get("resources", {})
    for key, value in resources.get("limits", {}).items():
        if "/" in key and resources.get("requests", {}).get(key) != value:
            errors.append(f"resources {key}: an extended resource's request must equal its limit")
    errors += pod_template_errors(predictor_pod(predictor))
    return errors


def predictor_pod(predictor: dict) -> dict:
    """The pod template KServe makes from a predictor with `model`: its container
    `kserve-container` (the ServingRuntime's image) with the model's args and resources."""
    model = predictor["model"]
    container = {
        "name": "kserve-container",
        "image": "kserve/huggingfaceserver",
        "args": model.get("args", []),
        "resources": model.get("resources", {}),
    }
    spec = {"containers": [container]}
    for key in ("serviceAccountName", "nodeSelector", "tolerations", "affinity"):
        if key in predictor:
            spec[key] = predictor[key]
    return {"spec": spec}
