"""Every object kubetune renders or ships, against the upstream CRDs in ../shared/schemas/
(Training Operator PyTorchJob, Trainer v2.3.0 TrainJob and ClusterTrainingRuntime, KServe
v0.20.0 InferenceService, Kueue v0.17.0): OpenAPI schema with strict fields and every
`x-kubernetes-validations` CEL rule, evaluated with cel-python (tests/k8s_schemas.py), plus the
webhook and API-server rules no schema shows. The rules are shown to refuse what the real
servers refuse, so a check that cannot fail does not pass for one."""

from __future__ import annotations

import copy
import functools
import shutil

import pytest
import yaml

from kubetune.components.backends.pytorchjob import render_job
from kubetune.components.backends.trainjob import render_runtime, render_trainjob
from kubetune.components.config import load_recipe
from kubetune.components.serve.render import render_inference_service

from .conftest import RECIPES
from .fake_k8s import shipped_runtime
from .k8s_schemas import (
    CEL_UNEVALUATED,
    CRDS,
    SCHEMAS,
    _cel_program,
    _crd,
    crd_errors,
    pod_rule_errors,
    pod_template_errors,
    pytorchjob_webhook_errors,
    trainer_webhook_errors,
    trainjob_pod,
)

RECIPE_FILES = sorted(RECIPES.glob("*.yaml"))


def rules_of(schema: dict, path: str = "") -> list[tuple[str, dict]]:
    out = [(path or "(root)", r) for r in schema.get("x-kubernetes-validations") or []]
    for key, sub in (schema.get("properties") or {}).items():
        out += rules_of(sub, f"{path}.{key}" if path else key)
    if isinstance(schema.get("items"), dict):
        out += rules_of(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        out += rules_of(schema["additionalProperties"], f"{path}{{}}")
    return out


def test_the_schemas_are_the_upstream_releases_and_every_cel_rule_compiles():
    files = {p.relative_to(SCHEMAS).as_posix() for p in SCHEMAS.rglob("*.yaml")}
    assert {name for name, _ in CRDS.values()} == files  # nothing left over, nothing missing
    assert not any("v2.0" in f or "v2.1" in f for f in files)
    counted = 0
    for kind in CRDS:
        schema = _crd(kind)[0]
        for _, rule in rules_of(schema):
            _cel_program(rule["rule"])  # cel-python parses every rule of every CRD
            counted += 1
    assert counted >= 40  # TrainJob 19, runtime 11, Kueue 10 served in v1beta2, PyTorchJob 1


@functools.cache
def rendered_objects() -> list[tuple[str, dict]]:
    """Every object kubetune renders for the shipped recipes, and the manifests it ships."""
    out = []
    for recipe in RECIPE_FILES:
        for nodes in (1, 2, 4):
            sets = [f"distributed.nodes={nodes}", "kubernetes.queue=gpu-queue"]
            cfg = load_recipe(recipe, [*sets, "distributed.backend=pytorchjob"])
            out.append((f"{recipe.stem} x{nodes} pytorchjob", render_job(cfg, "kt-x")))
            cfg = load_recipe(recipe, [*sets, "distributed.backend=trainjob"])
            out.append((f"{recipe.stem} x{nodes} trainjob", render_trainjob(cfg, "kt-x")))
        cfg = load_recipe(recipe, [])
        out.append((f"{recipe.stem} runtime", render_runtime(cfg)))
        out.append(
            (f"{recipe.stem} isvc", render_inference_service(cfg, "s3://models/kubetune/run-1"))
        )
    manifests = RECIPES.parent.parent / "manifests"
    for path in sorted(manifests.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") in CRDS:
                out.append((str(path.relative_to(manifests)), doc))
    return out


def test_every_rendered_and_shipped_object_is_admitted():
    kinds = set()
    for where, obj in rendered_objects():
        kinds.add(obj["kind"])
        errors = crd_errors(obj)
        if obj["kind"] == "PyTorchJob":
            errors += pytorchjob_webhook_errors(obj)
            for replica in obj["spec"]["pytorchReplicaSpecs"].values():
                errors += pod_template_errors(replica["template"])
        elif obj["kind"] == "TrainJob":
            errors += trainer_webhook_errors(obj)
            errors += pod_template_errors(trainjob_pod(shipped_runtime(), obj))
        assert errors == [], (where, errors)
    assert kinds == set(CRDS)
    # cel-python evaluated every rule it met: none had to be checked in code instead
    assert CEL_UNEVALUATED == {}, CEL_UNEVALUATED


def first(kind: str) -> dict:
    return copy.deepcopy(next(o for _, o in rendered_objects() if o["kind"] == kind))


def test_the_trainjob_crds_cel_rules_refuse_what_trainer_refuses():
    job = first("TrainJob")
    job["metadata"]["name"] = "7b-run"  # a DNS-1123 label, not a DNS-1035 one
    assert crd_errors(job) == [
        "(root): Invalid value: metadata.name must match RFC 1035 DNS label format"
    ]
    job = first("TrainJob")
    job["spec"]["managedBy"] = "kubetune.io/launcher"
    assert crd_errors(job) == [
        "spec.managedBy: Invalid value: ManagedBy must be trainer.kubeflow.org/trainjob-controller "
        "or kueue.x-k8s.io/multikueue if set"
    ]
    runtime = copy.deepcopy(shipped_runtime())
    runtime["spec"]["mlPolicy"]["mpi"] = {}  # two frameworks in one policy
    assert any("mlPolicy" in e for e in crd_errors(runtime)), crd_errors(runtime)


def test_the_webhooks_rules_refuse_what_the_operators_refuse():
    job = first("PyTorchJob")
    job["metadata"]["name"] = "7b-run"
    assert "DNS-1035" in pytorchjob_webhook_errors(job)[0]
    job = first("PyTorchJob")
    job["spec"]["pytorchReplicaSpecs"]["Master"]["replicas"] = 2
    job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["name"] = (
        "main"
    )
    assert pytorchjob_webhook_errors(job) == [
        "spec.pytorchReplicaSpecs[Master].replicas: Forbidden: must be 1",
        "spec.pytorchReplicaSpecs[Master].template.spec.containers: Required value: There is no "
        "container named pytorch",
    ]
    job = first("TrainJob")
    job["spec"]["runtimePatches"][0]["manager"] = "kubetune"
    assert "domain-prefixed path" in trainer_webhook_errors(job)[0]


def test_the_api_servers_pod_rules_refuse_what_it_refuses():
    """kubernetes/kubernetes pkg/apis/core/validation: ValidateResourceRequirements and
    ValidateVolumeMounts, which kubernetes-validate's schemas do not carry."""
    job = first("PyTorchJob")
    spec = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    assert pod_rule_errors(spec) == []
    container = spec["containers"][0]
    container["resources"] = {
        "requests": {"cpu": "4", "memory": "1Gi", "nvidia.com/gpu": 2},
        "limits": {"cpu": "3500m", "memory": "1Gi", "nvidia.com/gpu": 4},
    }
    container["volumeMounts"].append({"name": "nowhere", "mountPath": "/x"})
    container["volumeMounts"].append({"name": spec["volumes"][0]["name"], "mountPath": "/x"})
    assert pod_rule_errors(spec) == [
        "spec.containers[0].resources.requests: Invalid value: '4': must be less than or equal "
        "to cpu limit of '3500m'",
        "spec.containers[0].resources.requests[nvidia.com/gpu]: Invalid value: 2: must be equal "
        "to nvidia.com/gpu limit of 4",
        f"spec.containers[0].volumeMounts[{len(container['volumeMounts']) - 2}].name: Not "
        "found: 'nowhere'",
        f"spec.containers[0].volumeMounts[{len(container['volumeMounts']) - 1}].mountPath: "
        "Invalid value: '/x': must be unique",
    ]
    del container["resources"]["limits"]["nvidia.com/gpu"]
    assert "Limit must be set for non overcommitable resources (nvidia.com/gpu)" in " ".join(
        pod_rule_errors(spec)
    )
    # 1Gi is 1073741824 bytes, above 1G (10^9): exact quantities, not float strings
    container["resources"] = {"requests": {"memory": "1Gi"}, "limits": {"memory": "1G"}}
    container["volumeMounts"] = container["volumeMounts"][:-2]
    assert pod_rule_errors(spec) == [
        "spec.containers[0].resources.requests: Invalid value: '1Gi': must be less than or equal "
        "to memory limit of '1G'"
    ]


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="needs kubectl kustomize")
def test_the_kustomized_trainer_runtime_is_admitted():
    from .test_manifests import MANIFESTS, kustomize

    (runtime,) = kustomize(MANIFESTS / "trainer-v2")
    assert crd_errors(runtime) == []
