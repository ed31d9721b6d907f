"""manifests/ rendered by `kubectl kustomize` (offline) and validated against the real schemas;
the RBAC is least-privilege; images/ and pyproject.toml agree on versions."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

from kubetune.components.config import KubernetesConfig

from .conftest import REPO, run_cli

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib
from .k8s_schemas import core_errors, crd_errors, pod_template_errors, restricted_violations

MANIFESTS = REPO / "manifests"
OVERLAYS = sorted(p.parent for p in (MANIFESTS / "overlays").glob("*/kustomization.yaml"))
KUSTOMIZATIONS = [MANIFESTS / "base", *OVERLAYS]

pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None, reason="needs kubectl kustomize")


def kustomize(folder: Path) -> list[dict]:
    result = subprocess.run(
        ["kubectl", "kustomize", str(folder)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


@pytest.mark.parametrize("folder", KUSTOMIZATIONS, ids=[p.name for p in KUSTOMIZATIONS])
def test_every_kustomization_renders_valid_objects(folder):
    docs = kustomize(folder)
    kinds = sorted(d["kind"] for d in docs)
    assert {"ServiceAccount", "Role", "RoleBinding", "PersistentVolumeClaim"} <= set(kinds)
    for doc in docs:
        if doc["kind"] == "PyTorchJob":
            assert crd_errors(doc) == []
            for replica in doc["spec"]["pytorchReplicaSpecs"].values():
                assert pod_template_errors(replica["template"]) == []
                assert restricted_violations(replica["template"]["spec"]) == []
        else:
            assert core_errors(doc) == [], doc
    if folder.name != "base":
        assert all(d["metadata"]["namespace"] == "kubetune" for d in docs)
        assert "PyTorchJob" in kinds
    assert "Secret" not in kinds  # real keys are never overwritten by applying the manifests


def test_rbac_is_least_privilege():
    docs = kustomize(MANIFESTS / "base")
    (role,) = [d for d in docs if d["kind"] == "Role"]
    rules = {
        (group, resource): sorted(rule["verbs"])
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
    }
    assert rules == {
        ("kubeflow.org", "pytorchjobs"): sorted(["create", "get", "list", "watch", "delete"]),
        ("kubeflow.org", "pytorchjobs/status"): ["get"],
        ("trainer.kubeflow.org", "trainjobs"): sorted(["create", "get", "list", "watch", "delete"]),
        ("serving.kserve.io", "inferenceservices"): ["create", "get", "update"],
        ("", "pods"): ["get", "list", "watch"],
        ("", "pods/log"): ["get"],
        ("", "events"): ["list", "watch"],
        ("kueue.x-k8s.io", "workloads"): ["list"],
    }
    text = yaml.safe_dump(role)
    assert "*" not in text and "secrets" not in text and "pods/exec" not in text
    assert not any(d["kind"] in ("ClusterRole", "ClusterRoleBinding") for d in docs)
    (binding,) = [d for d in docs if d["kind"] == "RoleBinding"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "kubetune"}]
    trainer = next(d for d in docs if d["metadata"]["name"] == "kubetune-trainer")
    assert trainer["automountServiceAccountToken"] is False
    assert KubernetesConfig().service_account == "kubetune-trainer"
    pvc = next(d for d in docs if d["kind"] == "PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert pvc["metadata"]["name"] == KubernetesConfig().workspace_pvc


def test_secret_example_has_no_values():
    secret = yaml.safe_load((MANIFESTS / "base" / "s3-secret.example.yaml").read_text())
    assert core_errors(secret) == []
    assert secret["metadata"]["name"] == KubernetesConfig().s3_secret
    assert set(secret["stringData"]) >= {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    assert all(v == "" for v in secret["stringData"].values()) and "data" not in secret


@pytest.mark.parametrize("overlay", OVERLAYS, ids=[p.name for p in OVERLAYS])
def test_example_jobs_are_what_render_job_prints_today(overlay):
    name = overlay.name
    result = run_cli(
        "render-job",
        REPO / "pipelines" / "recipes" / f"{name}.yaml",
        "--name",
        name,
        "--set",
        "kubernetes.namespace=kubetune",
    )
    assert result.code == 0, result
    assert (overlay / "pytorchjob.yaml").read_text() == result.out
    job = yaml.safe_load(result.out)
    nodes = 1 + job["spec"]["pytorchReplicaSpecs"].get("Worker", {"replicas": 0})["replicas"]
    assert (name, nodes, job["spec"]["nprocPerNode"]) in (
        ("falcon-7b-qlora", 1, "8"),
        ("falcon-40b-qlora", 2, "8"),
    )


# --- images ---------------------------------------------------------------------------------


def constraints() -> dict[str, str]:
    pins = {}
    for line in (REPO / "images" / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[name.lower()] = version
    return pins


def test_versions_are_pinned_in_one_place_that_everything_shares():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = [Requirement(r) for r in project["dependencies"]]
    for extra in ("qlora", "deepspeed", "gpu", "lmeval"):
        requirements += [Requirement(r) for r in project["optional-dependencies"][extra]]
    pins = constraints()
    for req in requirements:
        assert req.name.lower() in pins, f"{req.name} is not pinned in images/constraints.txt"
        assert req.specifier.contains(pins[req.name.lower()]), (req, pins[req.name.lower()])
        # the lower bound is the pin: the version .ci/run's pinned tier really tests
        (lower,) = [s.version for s in req.specifier if s.operator == ">="]
        assert lower == pins[req.name.lower()], f"{req}: its lower bound is not the tested pin"
    dev_torch = next(
        Requirement(r) for r in project["optional-dependencies"]["dev"] if r.startswith("torch")
    )
    assert str(dev_torch.specifier) == f"=={pins['torch']}"

    trainer = (REPO / "images" / "trainer" / "Dockerfile").read_text()
    steps = (REPO / "images" / "steps" / "Dockerfile").read_text()
    base = re.search(r"^ARG BASE_IMAGE=pytorch/pytorch:([0-9.]+)-cuda", trainer, re.M)
    assert base and base.group(1) == pins["torch"]
    for dockerfile in (trainer, steps):
        assert "-c /src/images/constraints.txt" in dockerfile
        users = re.findall(r"^USER (\S+)", dockerfile, re.M)
        assert users and users[-1].split(":")[0] == str(KubernetesConfig().run_as_user)
    assert "[qlora,deepspeed,gpu,lmeval]" in trainer and "flash-attn" in trainer
    assert "[lmeval]" in steps  # evaluate runs in either image
    assert "-c images/constraints.txt" in (REPO / ".ci" / "run").read_text()

    version = project["version"]
    k8s = KubernetesConfig()
    for image in (k8s.trainer_image, k8s.steps_image, k8s.eval_image):
        assert image.endswith(f":{version}")


# vLLM 0.33.0's own requirements (its wheel's METADATA Requires-Dist)
VLLM_REQUIRES = ("torch==2.14.0", "transformers<5.21.0,>=5.16.1")


def test_the_eval_image_pins_what_vllm_requires_and_shares_every_other_pin():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    own = {}
    for line in (REPO / "images" / "eval" / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            own[name.lower()] = version
    (vllm,) = [Requirement(r) for r in project["optional-dependencies"]["vllm"]]
    assert vllm.specifier.contains(own["vllm"])
    image = {**constraints(), **own}  # what the eval image installs
    for requirement in map(Requirement, VLLM_REQUIRES):
        assert requirement.specifier.contains(image[requirement.name]), requirement
    for text in project["dependencies"]:  # kubetune's own ranges admit the image's versions
        requirement = Requirement(text)
        assert requirement.specifier.contains(image[requirement.name.lower()]), requirement
    dockerfile = (REPO / "images" / "eval" / "Dockerfile").read_text()
    # the shared pins the Dockerfile drops are exactly the ones this image replaces
    dropped = re.search(r"grep -vE '\^\(([a-z|_-]+)\)=='", dockerfile).group(1).split("|")
    assert sorted(dropped) == sorted(set(own) - {"vllm"})
    assert set(dropped) <= set(constraints())
    assert '"/src[vllm,lmeval]"' in dockerfile and "-c /tmp/constraints.txt" in dockerfile
    users = re.findall(r"^USER (\S+)", dockerfile, re.M)
    assert users and users[-1].split(":")[0] == str(KubernetesConfig().run_as_user)
