"""Validation against the real schemas: the Training Operator's PyTorchJob CRD (a copy in
../shared/schemas/), Trainer v2.3's TrainJob and ClusterTrainingRuntime through the
kubeflow-trainer-api models and their upstream v2.3.0 CRDs, KServe v0.20's InferenceService and
Kueue v0.17's CRDs (schemas with their CEL rules, evaluated by cel-python), the webhook and API
server rules no schema shows (each named with its upstream source), Kubernetes core/RBAC types
with kubernetes-validate, and the rules of the
"restricted" Pod Security Standard (https://kubernetes.io/docs/concepts/security/pod-security-standards/)."""

from __future__ import annotations

import copy
import functools
import re
from fractions import Fraction
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


CRDS = {  # kind → (file in ../shared/schemas, served version): the upstream CRDs, unchanged
    "PyTorchJob": ("kubeflow.org_pytorchjobs.yaml", "v1"),
    "TrainJob": ("trainer.kubeflow.org_trainjobs.v2.3.0.yaml", "v1alpha1"),
    "ClusterTrainingRuntime": (
        "trainer.kubeflow.org_clustertrainingruntimes.v2.3.0.yaml",
        "v1alpha1",
    ),
    "InferenceService": ("serving.kserve.io_inferenceservices.v0.20.0.yaml", "v1beta1"),
    "ResourceFlavor": ("kueue-v0.17.0/resourceflavors.yaml", "v1beta2"),
    "ClusterQueue": ("kueue-v0.17.0/clusterqueues.yaml", "v1beta2"),
    "LocalQueue": ("kueue-v0.17.0/localqueues.yaml", "v1beta2"),
    "WorkloadPriorityClass": ("kueue-v0.17.0/workloadpriorityclasses.yaml", "v1beta2"),
}


@functools.cache
def _crd(kind: str):
    """(the served version's schema, a strict validator of it, group, version, scope)."""
    name, served = CRDS[kind]
    crd = yaml.safe_load((SCHEMAS / name).read_text())
    assert crd["spec"]["names"]["kind"] == kind, (name, kind)
    version = next(v for v in crd["spec"]["versions"] if v["name"] == served)
    assert version.get("served", True), (name, served)
    schema = version["schema"]["openAPIV3Schema"]
    strict = _strict(copy.deepcopy(schema))
    # metadata is `type: object` in a CRD; the API server checks it as ObjectMeta (below)
    strict["properties"]["metadata"] = {"type": "object"}
    validator = jsonschema.Draft7Validator(strict)
    return schema, validator, crd["spec"]["group"], served, crd["spec"]["scope"]


# CEL rules cel-python could not evaluate, with where they sit: each is checked in code
# instead (tests/test_crd_rules.py names them). Filled as objects are validated.
CEL_UNEVALUATED: dict[tuple[str, str], str] = {}


@functools.cache
def _cel_program(rule: str):
    import celpy

    env = celpy.Environment()
    return env.program(env.compile(rule))


def cel_errors(schema: dict, value, path: str = "", kind: str = "") -> list[str]:
    """The schema's `x-kubernetes-validations` CEL rules, evaluated (cel-python) at every node
    of `value` they sit on, as the API server does on create. Transition rules (those that
    read oldSelf) apply only to updates and are skipped."""
    import celpy

    errors = []
    for check in schema.get("x-kubernetes-validations") or []:
        rule = check["rule"]
        if "oldSelf" in rule:
            continue
        try:
            result = _cel_program(rule).evaluate({"self": celpy.json_to_cel(value)})
        except Exception as exc:  # noqa: BLE001 - whatever cel-python cannot do is recorded
            result = exc
        if isinstance(result, (Exception, celpy.CELEvalError)):
            CEL_UNEVALUATED[(f"{kind} {path or '(root)'}", rule)] = str(result)[:200]
            continue
        if not bool(result):
            message = check.get("message") or f"failed rule: {rule}"
            errors.append(f"{path or '(root)'}: Invalid value: {message}")
    if isinstance(value, dict):
        properties = schema.get("properties") or {}
        extra = schema.get("additionalProperties")
        for key, item in value.items():
            sub = properties.get(key, extra if isinstance(extra, dict) else None)
            if sub is not None:
                errors += cel_errors(sub, item, f"{path}.{key}" if path else key, kind)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for n, item in enumerate(value):
            errors += cel_errors(schema["items"], item, f"{path}[{n}]", kind)
    return errors


DNS1123_SUBDOMAIN_MAX = 253


def crd_errors(obj: dict, kind: str | None = None) -> list[str]:
    """What the API server refuses when `obj` is created, from the upstream CRD alone: its
    OpenAPI schema with strict field validation, its CEL rules, and ObjectMeta's own checks
    (a DNS-1123 subdomain name; a namespace exactly when the kind is namespaced)."""
    kind = kind or obj.get("kind", "")
    schema, validator, group, served, scope = _crd(kind)
    errors = [
        f"{'.'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}"
        for e in validator.iter_errors(obj)
    ]
    if obj.get("apiVersion") != f"{group}/{served}" or obj.get("kind") != kind:
        errors.append(f"apiVersion/kind must be {group}/{served} {kind}")
    meta = obj.get("metadata") or {}
    name = meta.get("name", "")
    if len(name) > DNS1123_SUBDOMAIN_MAX or not DNS1123_SUBDOMAIN.match(name):
        errors.append(f"metadata.name: Invalid value: {name!r}: a lowercase RFC 1123 subdomain")
    if scope == "Cluster" and "namespace" in meta:
        errors.append(f"metadata.namespace: {kind} is cluster-scoped: no namespace")
    if not errors:  # CEL runs on objects the schema took
        errors += cel_errors(schema, obj, "", kind)
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
    """The core schema, then the API server's own pod rules that no schema shows."""
    return core_errors(
        {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template}
    ) or pod_rule_errors(template.get("spec") or {})


_DECIMAL = {"": 1, "m": Fraction(1, 1000), "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
            "P": 10**15, "E": 10**18}  # fmt: skip
_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}


def quantity_number(text) -> Fraction:
    """A resource.Quantity as an exact number (k8s.io/apimachinery pkg/api/resource)."""
    match = re.fullmatch(r"([+-]?[0-9.]+)(?:([eE][+-]?[0-9]+)|([a-zA-Z]*))", str(text))
    assert match, f"not a quantity: {text!r}"
    number, exponent, suffix = match.groups()
    value = Fraction(number)
    if exponent:
        return value * Fraction(10) ** int(exponent[1:])
    return value * (_BINARY[suffix] if suffix in _BINARY else _DECIMAL[suffix])


STANDARD_RESOURCES = ("cpu", "memory", "ephemeral-storage")  # overcommitable ones


def pod_rule_errors(spec: dict) -> list[str]:
    """What the API server refuses in a pod spec beyond its schema (kubernetes/kubernetes,
    pkg/apis/core/validation/validation.go): ValidateResourceRequirements (a request above its
    limit; an extended resource such as nvidia.com/gpu, or hugepages, without a limit or with a
    request unequal to it) and ValidateVolumeMounts (a mount naming no volume of the pod, two
    mounts at one path)."""
    errors = []
    volumes = {v.get("name") for v in spec.get("volumes") or []}
    for group in ("initContainers", "containers"):
        for n, container in enumerate(spec.get(group) or []):
            where = f"spec.{group}[{n}]"
            resources = container.get("resources") or {}
            requests, limits = resources.get("requests") or {}, resources.get("limits") or {}
            for name, request in requests.items():
                extended = name not in STANDARD_RESOURCES
                if extended and name not in limits:
                    errors.append(f"{where}.resources.limits: Required value: Limit must be set "
                                  f"for non overcommitable resources ({name})")  # fmt: skip
                elif name in limits:
                    limit = quantity_number(limits[name])
                    if quantity_number(request) > limit:
                        errors.append(f"{where}.resources.requests: Invalid value: {request!r}: "
                                      f"must be less than or equal to {name} limit of "
                                      f"{limits[name]!r}")  # fmt: skip
                    elif extended and quantity_number(request) != limit:
                        errors.append(f"{where}.resources.requests[{name}]: Invalid value: "
                                      f"{request!r}: must be equal to {name} limit of "
                                      f"{limits[name]!r}")  # fmt: skip
            paths = set()
            for m, mount in enumerate(container.get("volumeMounts") or []):
                if mount.get("name") not in volumes:
                    errors.append(f"{where}.volumeMounts[{m}].name: Not found: "
                                  f"{mount.get('name')!r}")  # fmt: skip
                if mount.get("mountPath") in paths:
                    errors.append(f"{where}.volumeMounts[{m}].mountPath: Invalid value: "
                                  f"{mount.get('mountPath')!r}: must be unique")  # fmt: skip
                paths.add(mount.get("mountPath"))
    return errors


DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def pytorchjob_webhook_errors(job: dict) -> list[str]:
    """What the Training Operator's PyTorchJob validating webhook (failurePolicy: fail) refuses
    and no schema shows (kubeflow/training-operator v1.9, pkg/webhooks/pytorch/
    pytorchjob_webhook.go and pkg/webhooks/utils): a name that is not a DNS-1035 label
    (NameIsDNS1035Label: a leading digit is refused), a Master with replicas other than 1, a
    replica type other than Master/Worker, a replica whose template has no `pytorch` container,
    an elasticPolicy without Workers, and elasticPolicy.nProcPerNode beside spec.nprocPerNode."""
    errors = []
    name = job.get("metadata", {}).get("name", "")
    if len(name) > 63 or not DNS1035.match(name):
        errors.append(f"metadata.name: Invalid value: {name!r}: should match: a DNS-1035 label "
                      "must consist of lower case alphanumeric characters or '-', start with an "
                      "alphabetic character, and end with an alphanumeric character")  # fmt: skip
    spec = job.get("spec", {})
    replicas = spec.get("pytorchReplicaSpecs") or {}
    for rtype, replica in replicas.items():
        path = f"spec.pytorchReplicaSpecs[{rtype}]"
        if rtype not in ("Master", "Worker"):
            errors.append(f"{path}: Unsupported value: {rtype!r}")
        if rtype == "Master" and replica.get("replicas") != 1:
            errors.append(f"{path}.replicas: Forbidden: must be 1")
        containers = ((replica.get("template") or {}).get("spec") or {}).get("containers") or []
        if not any(c.get("name") == "pytorch" for c in containers):
            errors.append(f"{path}.template.spec.containers: Required value: There is no "
                          "container named pytorch")  # fmt: skip
    elastic = spec.get("elasticPolicy")
    if elastic is not None:
        if "Worker" not in replicas:
            errors.append("spec.pytorchReplicaSpecs[Worker]: Required value: must be configured "
                          "if elastic policy is used")  # fmt: skip
        if elastic.get("nProcPerNode") is not None and spec.get("nprocPerNode") is not None:
            errors.append("spec.elasticPolicy.nProcPerNode: Forbidden: must not be used with "
                          "spec.nprocPerNode")  # fmt: skip
    return errors


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
