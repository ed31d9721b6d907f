"""Validation against the real schemas: the Training Operator's PyTorchJob CRD (a copy in
../shared/schemas/), Trainer v2.3's TrainJob and ClusterTrainingRuntime through the
kubeflow-trainer-api models (the CRD copies in ../shared/schemas/ are v2.0/2.1's), Kubernetes
core/RBAC types with kubernetes-validate, and the rules of the
"restricted" Pod Security Standard (https://kubernetes.io/docs/concepts/security/pod-security-standards/)."""

from __future__ import annotations

import copy
import functools
import re
from pathlib import Path

import jsonschema
import yaml

SCHEMAS = Path(__file__).resolve().parents[2] / "shared" / "schemas"
K8S_VERSION = "1.32.0"


def _strict(schema):
    """Unknown fields are errors (kubectl's strict field validation), except where the CRD
    itself preserves unknown fields."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if (
            schema.get("type") == "object"
            and "properties" in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
            and "additionalProperties" not in schema
        ):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    return schema


CRDS = {  # kind → (file in ../shared/schemas, served version)
    "PyTorchJob": ("kubeflow.org_pytorchjobs.yaml", "v1"),
    "TrainJob": ("trainer.kubeflow.org_trainjobs.yaml", "v1alpha1"),
    "ClusterTrainingRuntime": ("trainer.kubeflow.org_clustertrainingruntimes.yaml", "v1alpha1"),
}


@functools.cache
def _crd_validator(kind: str = "PyTorchJob"):
    name, served = CRDS[kind]
    crd = yaml.safe_load((SCHEMAS / name).read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == served)
    schema = copy.deepcopy(version["schema"]["openAPIV3Schema"])
    # metadata is `type: object` in a CRD; the API server checks it as ObjectMeta
    schema = _strict(schema)
    schema["properties"]["metadata"] = {"type": "object"}
    return jsonschema.Draft7Validator(schema), crd["spec"]["group"], served


def crd_errors(job: dict, kind: str = "PyTorchJob") -> list[str]:
    validator, group, served = _crd_validator(kind)
    errors = [
        f"{'.'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}"
        for e in validator.iter_errors(job)
    ]
    if job.get("apiVersion") != f"{group}/{served}" or job.get("kind") != kind:
        errors.append(f"apiVersion/kind must be {group}/{served} {kind}")
    name = job.get("metadata", {}).get("name", "")
    if not name or len(name) > 63:
        errors.append(f"metadata.name {name!r} must be a DNS label")
    return errors


def trainjob_pod(runtime: dict, job: dict) -> dict:
    """The pod template Trainer v2 makes for node 0 of `job` from `runtime`: the runtime's
    `node` template, with the TrainJob's trainer (image, command, env, resources) and its
    runtimePatches (pod labels, ServiceAccount, volumes, mounts, node selector, tolerations)
    applied as Trainer v2.2+ merges them (lists by name, maps key by key)."""
    (replicated,) = runtime["spec"]["template"]["spec"]["replicatedJobs"]
    pod = copy.deepcopy(replicated["template"]["spec"]["template"])
    (container,) = pod["spec"]["containers"]
    trainer = job["spec"]["trainer"]
    container.update(
        image=trainer["image"],
        command=trainer["command"],
        env=trainer["env"],
        resources=trainer["resourcesPerNode"],
    )
    assert "podSpecOverrides" not in job["spec"], "removed in Trainer v2.2"
    for patch in job["spec"].get("runtimePatches", []):
        template = patch["trainingRuntimeSpec"]["template"]
        for job_patch in template.get("spec", {}).get("replicatedJobs", []):
            assert job_patch["name"] == replicated["name"], job_patch["name"]
            pod_patch = job_patch["template"]["spec"]["template"]
            labels = pod_patch.get("metadata", {}).get("labels", {})
            pod.setdefault("metadata", {}).setdefault("labels", {}).update(labels)
            spec = pod_patch.get("spec", {})
            for key in (
                "serviceAccountName",
                "nodeSelector",
                "tolerations",
                "affinity",
                "priorityClassName",
            ):
                if key in spec:
                    pod["spec"][key] = spec[key]
            pod["spec"]["volumes"] = pod["spec"].get("volumes", []) + spec.get("volumes", [])
            for change in spec.get("containers", []):
                target = next(c for c in pod["spec"]["containers"] if c["name"] == change["name"])
                target["volumeMounts"] = target.get("volumeMounts", []) + change["volumeMounts"]
    return pod


TRAINER_API_VERSION = "2.3.0"  # kubeflow-trainer-api, pinned in pyproject.toml's dev extra


def trainer_api_errors(obj: dict) -> list[str]:
    """What Kubeflow Trainer's current API (the kubeflow-trainer-api models) refuses in a
    TrainJob or (Cluster)TrainingRuntime, or drops from it: a round trip must lose nothing."""
    import importlib.metadata

    from kubeflow_trainer_api import models
    from pydantic import ValidationError

    assert importlib.metadata.version("kubeflow-trainer-api") == TRAINER_API_VERSION
    kinds = {
        "TrainJob": models.TrainerV1alpha1TrainJob,
        "ClusterTrainingRuntime": models.TrainerV1alpha1ClusterTrainingRuntime,
        "TrainingRuntime": models.TrainerV1alpha1TrainingRuntime,
    }
    try:
        back = kinds[obj["kind"]].from_dict(obj).to_dict()
    except ValidationError as exc:
        return [f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()]
    return _lost(obj, back, "")


# k8s.io/apimachinery/pkg/util/validation: IsDomainPrefixedPath's two parts
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
HTTP_PATH = re.compile(r"^[A-Za-z0-9/\-._~%!$&'()*+,;=:]+$")


def is_domain_prefixed_path(value: str) -> bool:
    """Kubernetes' IsDomainPrefixedPath: `example.io/name`, a DNS-1123 subdomain of at most 253
    characters, a slash, an HTTP path."""
    host, slash, path = value.partition("/")
    return bool(
        slash and host and path and len(host) <= 253 and DNS1123_SUBDOMAIN.match(host)
        and HTTP_PATH.match(path)
    )  # fmt: skip


def trainer_webhook_errors(job: dict) -> list[str]:
    """What Trainer v2.3's TrainJob validating webhook (failurePolicy: Fail) refuses and no
    schema shows: every spec.runtimePatches[].manager must be a domain-prefixed path
    (kubeflow/trainer v2.3.0, pkg/runtime/framework/plugins/jobset/jobset.go)."""
    errors = []
    for n, patch in enumerate(job.get("spec", {}).get("runtimePatches") or []):
        manager = patch.get("manager", "")
        if not is_domain_prefixed_path(manager):
            errors.append(
                f"spec.runtimePatches[{n}].manager: Invalid value: {manager!r}: must be a "
                'domain-prefixed path (such as "acme.io/foo")'
            )
    return errors


TRAINING_API_VERSION = "1.9.3"  # kubeflow-training, pinned in pyproject.toml's dev extra


def pytorchjob_api_errors(job: dict) -> list[str]:
    """What the Training Operator's API models (kubeflow-training) drop from a PyTorchJob: a
    round trip through them must lose nothing (the CRD copy checks types and unknown fields)."""
    import importlib.metadata
    import json

    from kubeflow.training import ApiClient

    assert importlib.metadata.version("kubeflow-training") == TRAINING_API_VERSION

    class Response:
        data = json.dumps(job)

    client = ApiClient()
    back = client.sanitize_for_serialization(
        client.deserialize(Response(), "KubeflowOrgV1PyTorchJob")
    )
    # the models hold quantities as strings: a GPU count of 8 comes back as "8", the same
    # quantity to the API server
    same_quantity = re.compile(r".*\.resources\.(requests|limits)\.[^:]+: (\d+) came back as '\2'$")
    return [e for e in _lost(job, back, "") if not same_quantity.match(e)]


def _lost(given, kept, path: str) -> list[str]:
    if isinstance(given, dict) and isinstance(kept, dict):
        out = []
        for key, value in given.items():
            if key not in kept:
                out.append(f"{path}{key}: not in the API (dropped)")
            else:
                out += _lost(value, kept[key], f"{path}{key}.")
        return out
    if isinstance(given, list) and isinstance(kept, list) and len(given) == len(kept):
        pairs = enumerate(zip(given, kept, strict=True))
        return [e for i, (a, b) in pairs for e in _lost(a, b, f"{path}{i}.")]
    return [] if given == kept else [f"{path.rstrip('.')}: {given!r} came back as {kept!r}"]


def core_errors(obj: dict) -> list[str]:
    import kubernetes_validate

    try:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        path = ".".join(map(str, exc.path))
        return [f"{obj.get('kind')} {path}: {exc.message}"]
    return []


def pod_template_errors(template: dict) -> list[str]:
    return core_errors(
        {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template}
    )


def restricted_violations(pod_spec: dict) -> list[str]:
    """The "restricted" profile's checks (v1.32) on one pod spec."""
    problems = []
    pod_sc = pod_spec.get("securityContext", {})
    for forbidden in ("hostNetwork", "hostPID", "hostIPC"):
        if pod_spec.get(forbidden):
            problems.append(f"{forbidden} must not be set")
    allowed_volumes = {
        "configMap",
        "csi",
        "downwardAPI",
        "emptyDir",
        "ephemeral",
        "persistentVolumeClaim",
        "projected",
        "secret",
    }
    for volume in pod_spec.get("volumes", []):
        kinds = set(volume) - {"name"}
        if not kinds <= allowed_volumes:
            problems.append(f"volume {volume['name']}: type {kinds} not allowed")
    containers = pod_spec.get("containers", []) + pod_spec.get("initContainers", [])
    for c in containers:
        sc = c.get("securityContext", {})
        where = f"container {c['name']}"
        if sc.get("privileged"):
            problems.append(f"{where}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{where}: allowPrivilegeEscalation must be false")
        caps = sc.get("capabilities", {})
        if "ALL" not in caps.get("drop", []):
            problems.append(f"{where}: capabilities must drop ALL")
        if set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
            problems.append(f"{where}: adds capabilities")
        non_root = sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot"))
        if non_root is not True:
            problems.append(f"{where}: runAsNonRoot must be true")
        if sc.get("runAsUser", pod_sc.get("runAsUser")) == 0:
            problems.append(f"{where}: runAsUser 0")
        seccomp = sc.get("seccompProfile", pod_sc.get("seccompProfile", {})).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            problems.append(f"{where}: seccompProfile must be RuntimeDefault or Localhost")
        for port in c.get("ports", []):
            if port.get("hostPort"):
                problems.append(f"{where}: hostPort")
    return problems
