"""distributed.backend=trainjob: the Kubeflow Trainer v2 TrainJob and the runtime kubetune ships,
against Trainer v2's CRDs and the core schema, and the launcher against a loopback API server
answering Trainer v2's real REST paths (tests/fake_k8s.py)."""

from __future__ import annotations

import signal

import pytest
import yaml

from .conftest import REPO, TINY_DEMO, assert_user_error, run_cli
from .fake_k8s import shipped_runtime
from .k8s_schemas import (
    is_domain_prefixed_path,
    pod_template_errors,
    restricted_violations,
    trainer_api_errors,
    trainer_webhook_errors,
    trainjob_pod,
)
from .test_kubernetes import RECIPE_FILES, TRAIN, fake_kube, render, start, wait_for

TRAINJOB = ["--kind", "trainjob"]


def rendered(recipe, nodes: int, kind: str) -> dict:
    """What `render-job --kind KIND --name kt-run` prints, made in this process: the 21
    recipe x nodes cases as subprocesses would cost CI half a minute (the CLI is driven by the
    tests below and by test_kubernetes.py)."""
    from kubetune.components.backends.pytorchjob import render_job
    from kubetune.components.backends.trainjob import render_trainjob
    from kubetune.components.config import load_recipe

    cfg = load_recipe(recipe, [f"distributed.nodes={nodes}", "distributed.backend=trainjob"])
    return (render_trainjob if kind == "trainjob" else render_job)(cfg, "kt-run")


@pytest.mark.parametrize(
    "manager, admitted",
    [
        ("kubetune.io/launcher", True),
        ("kueue.x-k8s.io/manager", True),  # upstream's own managers
        ("trainer.kubeflow.org/kubeflow-sdk", True),
        ("kubetune", False),  # what kubetune sent before: every TrainJob was refused
        ("Kubetune.io/x", False),
        ("kubetune.io/", False),
        ("/launcher", False),
    ],
)
def test_trainers_webhook_admits_only_domain_prefixed_managers(manager, admitted):
    assert is_domain_prefixed_path(manager) is admitted
    job = {"spec": {"runtimePatches": [{"manager": manager}]}}
    assert (trainer_webhook_errors(job) == []) is admitted


@pytest.mark.parametrize("nodes", [1, 2, 4])
@pytest.mark.parametrize("recipe", RECIPE_FILES, ids=[p.stem for p in RECIPE_FILES])
def test_every_recipe_renders_a_valid_trainjob(recipe, nodes):
    """The TrainJob carries what the PyTorchJob's pods carry, and the pod Trainer v2 builds from
    it and the shipped runtime is a valid, "restricted" pod."""
    job = rendered(recipe, nodes, "trainjob")
    assert trainer_api_errors(job) == []  # Trainer v2.3's API keeps every field
    assert "podSpecOverrides" not in job["spec"] and "labels" not in job["spec"]
    (patch,) = job["spec"]["runtimePatches"]
    assert patch["manager"] == "kubetune.io/launcher"
    assert trainer_webhook_errors(job) == []  # Trainer's webhook admits it
    assert job["kind"] == "TrainJob" and job["spec"]["trainer"]["numNodes"] == nodes
    reference = rendered(recipe, nodes, "pytorchjob")
    master = reference["spec"]["pytorchReplicaSpecs"]["Master"]["template"]
    (container,) = master["spec"]["containers"]
    trainer = job["spec"]["trainer"]
    assert trainer["command"] == container["command"] and trainer["env"] == container["env"]
    assert trainer["resourcesPerNode"] == container["resources"]
    assert str(trainer["numProcPerNode"]) == reference["spec"]["nprocPerNode"]
    assert job["spec"]["runtimeRef"] == {
        "apiGroup": "trainer.kubeflow.org",
        "kind": "ClusterTrainingRuntime",
        "name": "kubetune-torch-distributed",
    }
    pod = trainjob_pod(shipped_runtime(), job)
    assert pod_template_errors(pod) == [] and restricted_violations(pod["spec"]) == []
    for key in ("serviceAccountName", "volumes", "nodeSelector", "tolerations"):
        assert pod["spec"].get(key) == master["spec"].get(key), key
    assert pod["spec"]["containers"][0]["volumeMounts"] == container["volumeMounts"]
    assert pod["spec"]["automountServiceAccountToken"] is False
    assert pod["metadata"]["labels"]["app.kubernetes.io/instance"] == "kt-run"
    env = {e["name"]: e for e in trainer["env"]}
    assert "value" not in env["AWS_SECRET_ACCESS_KEY"]  # secrets only by reference


def test_the_api_check_catches_what_trainer_v2_2_removed():
    """The v2.0/2.1 fields (podSpecOverrides, spec.labels, the runtime's numProcPerNode) are
    what the current API drops: the round trip names each."""
    import copy

    job = copy.deepcopy(rendered(TINY_DEMO, 1, "trainjob"))
    job["spec"]["podSpecOverrides"] = [{"targetJobs": [{"name": "node"}]}]
    job["spec"]["labels"] = {"team": "nlp"}
    assert sorted(trainer_api_errors(job)) == [
        "spec.labels: not in the API (dropped)",
        "spec.podSpecOverrides: not in the API (dropped)",
    ]
    runtime = yaml.safe_load(
        (REPO / "manifests" / "trainer-v2" / "clustertrainingruntime.yaml").read_text()
    )
    runtime["spec"]["mlPolicy"]["torch"]["numProcPerNode"] = "auto"
    assert trainer_api_errors(runtime) == [
        "spec.mlPolicy.torch.numProcPerNode: not in the API (dropped)"
    ]


def test_shipped_runtime_is_what_render_job_prints_and_valid():
    shipped = (REPO / "manifests" / "trainer-v2" / "clustertrainingruntime.yaml").read_text()
    printed = run_cli("render-job", TINY_DEMO, "--kind", "runtime")
    assert printed.code == 0, printed
    assert printed.out == shipped
    runtime = yaml.safe_load(shipped)
    assert trainer_api_errors(runtime) == []
    assert runtime["spec"]["mlPolicy"]["torch"] == {}  # numProcPerNode is the TrainJob's
    (replicated,) = runtime["spec"]["template"]["spec"]["replicatedJobs"]
    assert replicated["name"] == "node"  # the job and container Trainer v2's torch plugin fills
    pod = replicated["template"]["spec"]["template"]
    assert pod["spec"]["containers"][0]["name"] == "node"
    assert pod_template_errors(pod) == [] and restricted_violations(pod["spec"]) == []
    import subprocess

    rendered = subprocess.run(
        ["kubectl", "kustomize", str(REPO / "manifests" / "trainer-v2")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert [d["kind"] for d in yaml.safe_load_all(rendered)] == ["ClusterTrainingRuntime"]


def test_another_runtime_and_refused_settings():
    job = render(
        TINY_DEMO,
        "kubernetes.runtime=team-torch",
        "kubernetes.runtime_kind=TrainingRuntime",
        extra=TRAINJOB,
    )
    assert job["spec"]["runtimeRef"]["name"] == "team-torch"
    assert job["spec"]["runtimeRef"]["kind"] == "TrainingRuntime"
    runtime = render(
        TINY_DEMO, "kubernetes.runtime_kind=TrainingRuntime", extra=("--kind", "runtime")
    )
    assert runtime["kind"] == "TrainingRuntime" and runtime["metadata"]["namespace"] == "kubeflow"
    assert trainer_api_errors(runtime) == [] and trainer_api_errors(job) == []
    from kubetune.components.backends.trainjob import render_trainjob
    from kubetune.components.config import load_recipe
    from kubetune.components.errors import UserError

    elastic = load_recipe(TINY_DEMO, ["kubernetes.elastic_min_nodes=1"])
    with pytest.raises(UserError, match=r"kubernetes.elastic_min_nodes: .*\.elasticPolicy"):
        render_trainjob(elastic, "kt-run")
    bad = run_cli("render-job", TINY_DEMO, *TRAINJOB, "--set", "kubernetes.runtime=Not_A_Name")
    assert_user_error(bad, "kubernetes.runtime")


# --- the trainjob backend of the launcher ----------------------------------------------------

OK = [
    (0.2, "Created", "JobsCreationSucceeded", "succeeded to create Jobs"),
    (0.3, "pod", "", ""),
    (0.3, "log", "step 1/3 loss 2.0000", ""),
    (0.1, "log", "done: 3 steps", ""),
    (0.5, "Complete", "JobsCompleted", "jobs have been completed"),
]
TRAIN_V2 = [*TRAIN[:-1], "distributed.backend=trainjob"]


@pytest.fixture
def kube(tmp_path):
    yield from fake_kube(tmp_path, "trainjob")


@pytest.mark.integration
def test_trainjob_create_watch_logs_success(kube):
    kube.scenario = OK
    kube.failures = {"POST": [503]}
    result = run_cli(*TRAIN_V2, env=kube.env)
    assert result.code == 0, result
    assert kube.invalid == [] and kube.count("POST") == 2  # one 503, retried
    (_, path, body) = [r for r in kube.requests if r[0] == "POST"][-1]
    assert path == "/apis/trainer.kubeflow.org/v1alpha1/namespaces/kubeflow/trainjobs"
    name = body["metadata"]["name"]
    assert f"created TrainJob kubeflow/{name}" in result.out
    for line in ("Created", "step 1/3 loss 2.0000", "done: 3 steps", "succeeded"):
        assert line in result.out, result
    logs = [p for m, p, _ in kube.requests if "/log?" in p]
    assert logs and all(f"/pods/{name}-node-0-0-x7k2p/log?" in p for p in logs)
    assert body["spec"]["trainer"]["command"][-4:] == [
        "--dataset",
        "/workspace/ds",
        "--output",
        "/workspace/run",
    ]


@pytest.mark.integration
def test_trainjob_failure_reason_is_surfaced_and_replaced_on_retry(kube):
    kube.scenario = [
        (0.1, "Created", "", ""),
        (0.2, "Failed", "JobSetFailed", "jobset kt-x failed: node-0 pod exited with code 137"),
    ]
    result = run_cli(*TRAIN_V2, env=kube.env)
    assert result.code == 1, result
    assert "failed: JobSetFailed: jobset kt-x failed: node-0 pod exited with code 137" in result.err
    kube.scenario = OK
    again = run_cli(*TRAIN_V2, env=kube.env)
    assert again.code == 0, again
    assert "failed before; deleting it and starting again" in again.out
    assert kube.count("POST") == 2 and kube.count("DELETE") == 1


@pytest.mark.integration
def test_trainjob_cancel_deletes_and_a_retry_adopts(kube):
    kube.scenario = OK[:3]  # stays running
    first = start(kube, TRAIN_V2)
    wait_for(lambda: any("watch=" in p for _, p, _ in kube.requests) and kube.jobs)
    first.kill()  # the launcher's pod dies; the job keeps running
    first.communicate(timeout=30)
    name = next(iter(kube.jobs))
    second = start(kube, TRAIN_V2)
    wait_for(lambda: sum("watch=" in p for _, p, _ in kube.requests) >= 2)
    second.send_signal(signal.SIGTERM)
    out, err = second.communicate(timeout=60)
    assert second.returncode == 128 + signal.SIGTERM, (out, err)
    assert f"TrainJob kubeflow/{name} already exists (Created): watching it" in out
    assert f"SIGTERM: deleting TrainJob kubeflow/{name}" in err
    assert kube.count("POST") == 1 and kube.jobs == {}
    assert kube.count("DELETE", f"/trainjobs/{name}") == 1


@pytest.mark.integration
def test_no_trainer_v2_installed_is_one_clear_line(kube):
    kube.kind = {**kube.kind, "jobs": "/apis/elsewhere/{ns}/x"}  # the API knows no trainjobs
    result = run_cli(*TRAIN_V2, env=kube.env)
    assert_user_error(result, "no trainjobs.trainer.kubeflow.org/v1alpha1", "Kubeflow Trainer v2")
