"""manifests/kueue/: the example ResourceFlavor, ClusterQueue, LocalQueue and
WorkloadPriorityClasses, rendered by `kubectl kustomize` and checked against Kueue's API
(tests/kueue_api.py), against each other, and against the shipped recipes: the flavor is the
node pool the A100 recipes select, and the queue's quota admits each of them."""

from __future__ import annotations

import shutil

import pytest

from kubetune.components.backends.pytorchjob import render_job
from kubetune.components.config import load_recipe

from .conftest import RECIPES
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


def test_the_flavor_is_the_recipes_node_pool_and_the_quota_admits_them(objects):
    """Kueue puts the flavor's node labels and tolerations on the pods it admits, so they must
    be the pool the recipes select; a job whose requests exceed the nominal quota would wait
    forever."""
    (flavor,) = objects["ResourceFlavor"]
    (queue,) = objects["ClusterQueue"]
    (group,) = queue["spec"]["resourceGroups"]
    (quota,) = [f for f in group["flavors"] if f["name"] == flavor["metadata"]["name"]]
    nominal = {r["name"]: _amount(r["nominalQuota"]) for r in quota["resources"]}
    pooled = []
    for recipe in sorted(RECIPES.glob("*.yaml")):
        cfg = load_recipe(recipe, ["kubernetes.queue=gpu-queue", "distributed.backend=pytorchjob"])
        if cfg.kubernetes.node_selector != flavor["spec"]["nodeLabels"]:
            continue
        pooled.append(recipe.stem)
        assert cfg.kubernetes.tolerations == flavor["spec"]["tolerations"], recipe
        job = render_job(cfg, "kt-x")
        total: dict[str, float] = {}
        for replica in job["spec"]["pytorchReplicaSpecs"].values():
            (container,) = replica["template"]["spec"]["containers"]
            for name, value in container["resources"]["requests"].items():
                total[name] = total.get(name, 0) + replica["replicas"] * _amount(value)
        for name, need in total.items():
            assert need <= nominal[name], (recipe.stem, name, need, nominal[name])
    assert {"falcon-7b-qlora", "falcon-40b-qlora"} <= set(pooled)


def _amount(quantity) -> float:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "m": 1e-3}
    text = str(quantity)
    for suffix, factor in units.items():
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    return float(text)


def test_the_checks_refuse_what_kueue_refuses(objects):
    import copy

    (queue,) = objects["ClusterQueue"]
    bad = copy.deepcopy(queue)
    bad["spec"]["cohort"] = "team"  # v1beta1's name: v1beta2 has cohortName
    bad["spec"]["resourceGroups"][0]["flavors"][0]["resources"].reverse()
    bad["spec"]["preemption"]["withinClusterQueue"] = "Always"
    bad["metadata"]["namespace"] = "kubeflow"
    errors = "\n".join(kueue_errors(bad))
    for expected in ("'cohort' was unexpected", "in that order", "'Always'", "cluster-scoped"):
        assert expected in errors, errors
    (local,) = objects["LocalQueue"]
    assert kueue_errors({**local, "spec": {}}) == [
        "LocalQueue spec: 'clusterQueue' is a required property"
    ]
