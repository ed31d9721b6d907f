"""manifests/kueue/: the example ResourceFlavors, ClusterQueue, LocalQueue and
WorkloadPriorityClasses, rendered by `kubectl kustomize` and checked against Kueue v0.17's CRDs
and webhooks (tests/kueue_api.py), against each other, and against the shipped recipes: Kueue's
flavor assignment puts every recipe's pods on the pool it selects, within quota."""

from __future__ import annotations

import copy
import shutil
from fractions import Fraction

import pytest

from kubetune.components.backends.pytorchjob import render_job
from kubetune.components.backends.trainjob import render_trainjob
from kubetune.components.config import load_recipe

from .conftest import RECIPES
from .fake_k8s import shipped_runtime
from .k8s_schemas import quantity_number, trainjob_pod
from .kueue_api import kueue_errors
from .test_manifests import MANIFESTS, kustomize

pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None, reason="needs kubectl kustomize")


@pytest.fixture(scope="module")
def objects() -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for obj in kustomize(MANIFESTS / "kueue"):
        out.setdefault(obj["kind"], []).append(obj)
    return out


def test_every_object_is_valid_kueue_api(objects):
    assert set(objects) == {"ResourceFlavor", "ClusterQueue", "LocalQueue", "WorkloadPriorityClass"}
    for items in objects.values():
        for obj in items:
            assert kueue_errors(obj) == [], obj


def test_the_queue_chain_holds_together(objects):
    flavors = {f["metadata"]["name"] for f in objects["ResourceFlavor"]}
    queues = {q["metadata"]["name"]: q for q in objects["ClusterQueue"]}
    (local,) = objects["LocalQueue"]
    assert local["metadata"]["name"] == "gpu-queue"  # what the README's examples name
    assert local["metadata"]["namespace"] == "kubeflow"  # kubernetes.namespace's default
    assert local["spec"]["clusterQueue"] in queues
    for queue in queues.values():
        for group in queue["spec"]["resourceGroups"]:
            assert {"cpu", "memory", "nvidia.com/gpu"} <= set(group["coveredResources"])
            assert {f["name"] for f in group["flavors"]} <= flavors
    priorities = {p["metadata"]["name"]: p["value"] for p in objects["WorkloadPriorityClass"]}
    assert priorities["kubetune-production"] > priorities["kubetune-research"]


def assign_flavor(queue: dict, flavors: dict[str, dict], selector: dict, need: dict) -> str | None:
    """Kueue's flavor assigner for one pod set (kubernetes-sigs/kueue v0.17.0,
    pkg/scheduler/flavorassigner/flavorassigner.go): the flavors of the group covering the
    resources, in order; a flavor whose node labels disagree with the pods' node selector is
    skipped; the first whose nominal quota holds every resource the pods ask for is taken."""
    (group,) = queue["spec"]["resourceGroups"]
    for flavor in group["flavors"]:
        labels = flavors[flavor["name"]]["spec"].get("nodeLabels") or {}
        if any(key in selector and selector[key] != value for key, value in labels.items()):
            continue
        quota = {r["name"]: quantity_number(r["nominalQuota"]) for r in flavor["resources"]}
        if all(amount <= quota.get(name, 0) for name, amount in need.items()):
            return flavor["name"]
    return None


@pytest.mark.parametrize("backend", ["pytorchjob", "trainjob"])
def test_every_recipe_is_admitted_on_its_own_pool(objects, backend):
    """Kueue puts the flavor's node labels and tolerations on the pods it admits, so a GPU
    recipe must land on the flavor of the pool it selects; a job whose requests exceed every
    flavor's quota would wait forever."""
    (queue,) = objects["ClusterQueue"]
    flavors = {f["metadata"]["name"]: f for f in objects["ResourceFlavor"]}
    landed = {}
    for recipe in sorted(RECIPES.glob("*.yaml")):
        cfg = load_recipe(recipe, ["kubernetes.queue=gpu-queue", f"distributed.backend={backend}"])
        need: dict[str, Fraction] = {}
        if backend == "pytorchjob":
            pods = [
                (replica["replicas"], replica["template"]["spec"])
                for replica in render_job(cfg, "kt-x")["spec"]["pytorchReplicaSpecs"].values()
            ]
        else:
            job = render_trainjob(cfg, "kt-x")
            pods = [
                (job["spec"]["trainer"]["numNodes"], trainjob_pod(shipped_runtime(), job)["spec"])
            ]
        for count, spec in pods:
            (container,) = spec["containers"]
            for name, value in container["resources"]["requests"].items():
                need[name] = need.get(name, Fraction(0)) + count * quantity_number(value)
        selector = cfg.kubernetes.node_selector
        flavor = assign_flavor(queue, flavors, selector, need)
        assert flavor is not None, (recipe.stem, need)
        if need.get("nvidia.com/gpu"):  # a GPU recipe lands on the pool it selects
            assert flavors[flavor]["spec"]["nodeLabels"] == selector, (recipe.stem, flavor)
            assert cfg.kubernetes.tolerations == flavors[flavor]["spec"]["tolerations"]
        landed[recipe.stem] = flavor
    assert landed == {
        "falcon-180b-lora-zero3": "h100-80gb",
        "falcon-40b-qlora": "a100-80gb",
        "falcon-7b-qlora": "a100-80gb",
        "gpt-oss-20b-lora": "h100-80gb",
        "llama3-70b-full-fsdp": "h100-80gb",
        "llama3-70b-qlora-fsdp": "h100-80gb",
        "llama3-8b-lora-fsdp": "a100-80gb",
        "qwen3-30b-a3b-qlora": "l4-24gb",
        "tiny-demo": "cpu",
        "tiny-dpo": "cpu",
        "tiny-sft-dpo": "cpu",
    }
    # one node fewer of quota on the H100 pool and the largest recipe never runs
    smaller = copy.deepcopy(queue)
    h100 = smaller["spec"]["resourceGroups"][0]["flavors"][2]
    assert h100["name"] == "h100-80gb"
    h100["resources"][2]["nominalQuota"] = 24
    cfg = load_recipe(RECIPES / "falcon-180b-lora-zero3.yaml", ["kubernetes.queue=gpu-queue"])
    assert (
        assign_flavor(smaller, flavors, cfg.kubernetes.node_selector, {"nvidia.com/gpu": 32})
        is None
    )


def test_the_checks_refuse_what_kueue_refuses(objects):
    (queue,) = objects["ClusterQueue"]
    # the CRD: v1beta1's field name, an enum, a namespace on a cluster-scoped object
    bad = copy.deepcopy(queue)
    bad["spec"]["cohort"] = "team"  # v1beta1's name: v1beta2 has cohortName
    bad["spec"]["preemption"]["withinClusterQueue"] = "Always"
    bad["metadata"]["namespace"] = "kubeflow"
    errors = "\n".join(kueue_errors(bad))
    for expected in ("'cohort' was unexpected", "'Always'", "cluster-scoped"):
        assert expected in errors, errors
    # the CRD's CEL rules
    bad = copy.deepcopy(queue)
    bad["spec"]["resourceGroups"][0]["flavors"][1]["resources"][0]["borrowingLimit"] = "8"
    assert kueue_errors(bad) == [
        "ClusterQueue spec: Invalid value: borrowingLimit must be nil when cohort is empty"
    ]
    bad = copy.deepcopy(queue)
    bad["spec"]["resourceGroups"][0]["flavors"][1]["resources"].pop()
    assert kueue_errors(bad) == [
        "ClusterQueue spec.resourceGroups[0]: Invalid value: flavors must have the same number "
        "of resources as the coveredResources"
    ]
    # the ClusterQueue webhook's rules
    bad = copy.deepcopy(queue)
    bad["spec"]["resourceGroups"][0]["flavors"][1]["resources"].reverse()
    assert "in that order" in "\n".join(kueue_errors(bad))
    bad = copy.deepcopy(queue)
    bad["spec"]["cohortName"] = "research"
    bad["spec"]["resourceGroups"][0]["flavors"][1]["resources"][2]["lendingLimit"] = 17
    assert kueue_errors(bad) == [
        "ClusterQueue spec.resourceGroups[0].flavors[1].resources[2].lendingLimit: must be less "
        "than or equal to the nominalQuota"
    ]
    del bad["spec"]["cohortName"]
    bad["spec"]["resourceGroups"][0]["flavors"][1]["resources"][2]["lendingLimit"] = 8
    assert kueue_errors(bad) == [
        "ClusterQueue spec.resourceGroups[0].flavors[1].resources[2].lendingLimit: must be nil "
        "when cohort is empty"
    ]
    bad = copy.deepcopy(queue)
    bad["metadata"]["name"] = "Kubetune_GPU"
    assert "RFC 1123 subdomain" in "\n".join(kueue_errors(bad))
    (local,) = objects["LocalQueue"]
    namespaced = copy.deepcopy(local)
    del namespaced["metadata"]["namespace"]
    assert kueue_errors(namespaced) == ["LocalQueue gpu-queue: needs a namespace"]
    bad = copy.deepcopy(
        next(f for f in objects["ResourceFlavor"] if f["metadata"]["name"] != "cpu")
    )
    bad["spec"]["tolerations"][0]["value"] = "x"  # operator Exists with a value: a CEL rule
    assert kueue_errors(bad) == [
        "ResourceFlavor spec.tolerations: Invalid value: a value must be empty when 'operator' "
        "is 'Exists'"
    ]
