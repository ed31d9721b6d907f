"""KFP's TaskConfig passthrough and the KFP run workspace: what the train task passes on
(resources, env, node selector, tolerations, affinity, volumes) reaches the PyTorchJob and the
TrainJob beside the recipe's values, the recipe winning where both set a thing, and with
kubernetes.workspace=kfp the training pods mount the run's own workspace PVC."""

from __future__ import annotations

import json

import pytest
from kfp import dsl

from kubetune.components.backends.taskconfig import ENV, TaskConfig

from .conftest import TINY_DEMO, assert_user_error, run_cli
from .fake_k8s import shipped_runtime
from .k8s_schemas import trainjob_pod
from .test_kubernetes import OK_SCENARIO, fake_kube

# what KFP's driver hands a task whose pipeline sets these on it (TaskConfig's JSON shape)
TASK = {
    "resources": {
        "requests": {"cpu": "2", "ephemeral-storage": "200Gi"},
        "limits": {"memory": "1Gi", "rdma/ib": "1"},
    },
    "env": [{"name": "NCCL_DEBUG", "value": "INFO"}, {"name": "HF_HOME", "value": "/elsewhere"}],
    "node_selector": {"topology.kubernetes.io/zone": "us-east-1a", "pool": "task-pool"},
    "tolerations": [{"key": "spot", "operator": "Exists", "effect": "NoSchedule"}],
    "affinity": {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {"matchExpressions": [{"key": "gpu", "operator": "In", "values": ["a"]}]}
                ]
            }
        }
    },
    "volumes": [
        {"name": "kfp-workspace", "persistentVolumeClaim": {"claimName": "run-7f3c-kfp-workspace"}},
        {
            "name": "datasets",
            "persistentVolumeClaim": {"claimName": "shared-data", "readOnly": True},
        },
    ],
    "volume_mounts": [
        {"name": "kfp-workspace", "mountPath": "/kfp-workspace"},
        {"name": "datasets", "mountPath": "/data", "readOnly": True},
    ],
}


def test_from_kfps_taskconfig_and_back():
    given = dsl.TaskConfig(
        node_selector=TASK["node_selector"],
        volumes=TASK["volumes"],
        volume_mounts=TASK["volume_mounts"],
    )
    ours = TaskConfig.from_kfp(given)
    assert ours.env == [] and ours.node_selector == TASK["node_selector"]
    assert ours.workspace_claim("/kfp-workspace") == "run-7f3c-kfp-workspace"
    assert ours.workspace_claim("/workspace") is None
    assert json.loads(ours.to_json()).keys() == {"node_selector", "volumes", "volume_mounts"}
    assert TaskConfig.from_kfp(dsl.TaskConfig()) == TaskConfig()  # nothing passed through


@pytest.fixture(params=["pytorchjob", "trainjob"])
def kube(request, tmp_path):
    yield from fake_kube(tmp_path, request.param)


def pod_of(kube, body) -> tuple[dict, dict]:
    """(pod spec, container) of rank 0 as the job makes it."""
    if kube.kind["kind"] == "PyTorchJob":
        template = body["spec"]["pytorchReplicaSpecs"]["Master"]["template"]
    else:
        template = trainjob_pod(shipped_runtime(), body)
    return template["spec"], template["spec"]["containers"][0]


@pytest.mark.integration
def test_the_tasks_settings_reach_the_job_beside_the_recipes(kube):
    """On a KFP workspace, through `kubetune train` against the loopback API server (which
    checks the job against its CRD, the upstream models and the pod schema)."""
    kind = kube.kind["kind"]
    kube.scenario = OK_SCENARIO if kind == "PyTorchJob" else [(0.2, "Complete", "", "")]
    env = {**kube.env, ENV: json.dumps(TASK)}
    result = run_cli(
        "train",
        TINY_DEMO,
        "--dataset",
        "/kfp-workspace/runs/r1/dataset",
        "--output",
        "/kfp-workspace/runs/r1/train",
        "--set",
        f"distributed.backend={kind.lower()}",
        "--set",
        "kubernetes.workspace=kfp",
        "--set",
        "kubernetes.node_selector={pool: recipe-pool}",
        env=env,
    )
    assert result.code == 0, result
    assert kube.invalid == []
    (_, _, body) = next(r for r in kube.requests if r[0] == "POST")
    spec, container = pod_of(kube, body)
    if kind == "TrainJob":
        container = {**container, "env": body["spec"]["trainer"]["env"]}
    # the run's own workspace, at KFP's mount path; the task's other volume beside it
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["workspace"]["persistentVolumeClaim"] == {"claimName": "run-7f3c-kfp-workspace"}
    assert "kfp-workspace" not in volumes  # the same PVC, not mounted twice
    assert volumes["datasets"]["persistentVolumeClaim"]["claimName"] == "shared-data"
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounts["/kfp-workspace"] == "workspace" and mounts["/data"] == "datasets"
    # resources: the recipe's cpu and memory win, the task adds what the recipe leaves out
    resources = container["resources"]
    assert resources["requests"]["cpu"] == "8" and resources["limits"]["memory"] == "64Gi"
    assert resources["requests"]["ephemeral-storage"] == "200Gi"
    assert resources["limits"]["rdma/ib"] == "1"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["NCCL_DEBUG"] == "INFO" and env["HF_HOME"] == "/kfp-workspace/cache/huggingface"
    assert spec["nodeSelector"] == {
        "pool": "recipe-pool",
        "topology.kubernetes.io/zone": "us-east-1a",
    }
    assert spec["tolerations"] == TASK["tolerations"] and spec["affinity"] == TASK["affinity"]
    recipe = yaml_recipe(container)
    assert recipe["kubernetes"]["workspace_mount"] == "/kfp-workspace"


def yaml_recipe(container: dict) -> dict:
    import yaml

    (value,) = [e["value"] for e in container["env"] if e["name"] == "KUBETUNE_RECIPE"]
    return yaml.safe_load(value)


def test_bad_task_config_and_workspace_settings_are_clear():
    env = {ENV: "{not json"}
    bad = run_cli(
        "train",
        TINY_DEMO,
        "--dataset",
        "/workspace/d",
        "--output",
        "/workspace/o",
        "--set",
        "distributed.backend=pytorchjob",
        env=env,
    )
    assert_user_error(bad, f"{ENV}: not JSON")
    mount = run_cli(
        "render-job",
        TINY_DEMO,
        "--set",
        "kubernetes.workspace=kfp",
        "--set",
        "kubernetes.workspace_mount=/data",
    )
    assert_user_error(mount, "KFP mounts the run's workspace at /kfp-workspace")
    size = run_cli("render-job", TINY_DEMO, "--set", "kubernetes.workspace_size=lots")
    assert_user_error(size, "kubernetes.workspace_size")
