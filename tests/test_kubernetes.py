"""`kubetune render-job` against the PyTorchJob CRD and the core schema, and the `pytorchjob`
backend of `kubetune train` against a loopback Kubernetes API (tests/fake_k8s.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from .conftest import KUBETUNE, RECIPES, TINY_DEMO, assert_user_error, run_cli
from .fake_k8s import FakeKube
from .k8s_schemas import (
    crd_errors,
    pod_template_errors,
    pytorchjob_api_errors,
    pytorchjob_webhook_errors,
    restricted_violations,
)

RECIPE_FILES = sorted(RECIPES.glob("*.yaml"))


def render(recipe, *sets: str, extra: tuple = ()) -> dict:
    args = [a for s in sets for a in ("--set", s)] + list(extra)
    result = run_cli("render-job", recipe, *args)
    assert result.code == 0, result
    return yaml.safe_load(result.out)


@pytest.mark.parametrize("nodes", [1, 2, 4])
@pytest.mark.parametrize("recipe", RECIPE_FILES, ids=[p.stem for p in RECIPE_FILES])
def test_every_recipe_renders_a_valid_job(recipe, nodes):
    job = render(recipe, f"distributed.nodes={nodes}", "distributed.backend=pytorchjob")
    assert crd_errors(job) == [] and pytorchjob_api_errors(job) == []
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] == 1
    assert replicas.get("Worker", {"replicas": 0})["replicas"] == nodes - 1
    cfg = yaml.safe_load(run_cli("config", recipe).out)
    assert job["spec"]["nprocPerNode"] == str(cfg["distributed"]["procs_per_node"])
    assert job["spec"]["runPolicy"]["activeDeadlineSeconds"] > 0
    for replica in replicas.values():
        assert replica["restartPolicy"] == "OnFailure"
        template = replica["template"]
        assert pod_template_errors(template) == []
        assert restricted_violations(template["spec"]) == []
        (container,) = template["spec"]["containers"]
        assert container["name"] == "pytorch"
        assert container["command"][:3] == ["python", "-m", "torch.distributed.run"]
        assert "kubetune.components.train.worker" in container["command"]
        env = {e["name"]: e for e in container["env"]}
        # the recipe every pod reads is the resolved recipe, nodes included
        carried = yaml.safe_load(env["KUBETUNE_RECIPE"]["value"])
        assert carried["distributed"]["nodes"] == nodes
        assert {k: v for k, v in carried.items() if k != "distributed"} == {
            k: v for k, v in cfg.items() if k != "distributed"
        }
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert "value" not in env[key] and env[key]["valueFrom"]["secretKeyRef"]["key"] == key
        gpus = container["resources"]["limits"].get("nvidia.com/gpu")
        assert gpus == (
            None if cfg["hardware"]["gpu"] == "none" else int(job["spec"]["nprocPerNode"])
        )
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
        assert volumes["workspace"]["persistentVolumeClaim"]["claimName"] == "kubetune-workspace"


def test_node_pool_settings_and_elastic_policy():
    job = render(
        RECIPES / "falcon-40b-qlora.yaml",
        "distributed.nodes=4",
        "kubernetes.elastic_min_nodes=2",
        "kubernetes.hf_secret=hf-token",
    )
    assert crd_errors(job) == []
    spec = job["spec"]
    assert spec["elasticPolicy"] == {
        "rdzvBackend": "c10d",
        "minReplicas": 2,
        "maxReplicas": 4,
        "maxRestarts": 3,
    }
    assert list(spec["pytorchReplicaSpecs"]) == ["Worker"]
    pod = spec["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}
    assert pod["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    ]
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {
        "name": "hf-token",
        "key": "HF_TOKEN",
        "optional": True,
    }
    too_many = run_cli(
        "render-job", RECIPES / "falcon-40b-qlora.yaml", "--set", "kubernetes.elastic_min_nodes=3"
    )
    assert_user_error(too_many, "kubernetes.elastic_min_nodes=3 is more than distributed.nodes=2")
    outside = run_cli("render-job", TINY_DEMO, "--dataset", "/data/x")
    assert_user_error(outside, "--dataset /data/x", "under /workspace")


def test_pods_read_the_fetched_model_with_the_hub_off():
    """With model.local_dir (the fetch step's copy on the workspace volume) every pod gets
    HF_HUB_OFFLINE=1 and the recipe naming that folder; a copy off the volume is refused."""
    fetched = "/workspace/models/tiiuae--falcon-7b@0123abcd"
    job = render(RECIPES / "falcon-7b-qlora.yaml", f"model.local_dir={fetched}")
    assert crd_errors(job) == []
    for replica in job["spec"]["pytorchReplicaSpecs"].values():
        (container,) = replica["template"]["spec"]["containers"]
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["HF_HUB_OFFLINE"] == "1"
        assert yaml.safe_load(env["KUBETUNE_RECIPE"])["model"]["local_dir"] == fetched
    plain = render(RECIPES / "falcon-7b-qlora.yaml")
    (container,) = plain["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"]
    assert "HF_HUB_OFFLINE" not in {e["name"] for e in container["env"]}
    off = run_cli("render-job", TINY_DEMO, "--set", "model.local_dir=/home/me/model")
    assert_user_error(off, "model.local_dir: /home/me/model is not on the workspace volume")


# --- the pytorchjob backend ------------------------------------------------------------------

OK_SCENARIO = [
    (0.2, "Created", "", ""),
    (0.3, "Running", "", ""),
    (0.3, "log", "step 1/3 loss 2.0000", ""),
    (0.1, "log", "step 2/3 loss 1.5000", ""),
    (0.1, "log", "done: 3 steps", ""),
    (0.5, "Succeeded", "", ""),
]


def fake_kube(tmp_path, kind: str = "pytorchjob"):
    """A loopback API server for `kind` and the environment that points the launcher at it."""
    fake = FakeKube(kind=kind)
    fake.env = {
        "KUBECONFIG": str(fake.kubeconfig(tmp_path)),
        "KUBETUNE_API_BACKOFF": "0.05",
        "KUBETUNE_API_ATTEMPTS": "4",
        "KUBETUNE_WATCH_TIMEOUT": "3",
    }
    os.environ.pop("KUBERNETES_SERVICE_HOST", None)
    fake.expect_forbidden = False  # a test of a refusing Role sets it
    yield fake
    fake.close()
    # every request the launcher made is one the shipped Role allows
    assert fake.expect_forbidden or fake.forbidden == [], fake.forbidden


@pytest.fixture
def kube(tmp_path):
    yield from fake_kube(tmp_path)


TRAIN = [
    "train",
    TINY_DEMO,
    "--dataset",
    "/workspace/ds",
    "--output",
    "/workspace/run",
    "--set",
    "distributed.backend=pytorchjob",
]


def start(kube, args=TRAIN) -> subprocess.Popen:
    return subprocess.Popen(
        [KUBETUNE, *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **kube.env},
    )


def wait_for(predicate, timeout=60):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.integration
def test_create_watch_logs_success(kube):
    kube.scenario = OK_SCENARIO
    result = run_cli(*TRAIN, env=kube.env)
    assert result.code == 0, result
    assert kube.invalid == [] and kube.count("POST") == 1
    (_, _, body) = next(r for r in kube.requests if r[0] == "POST")
    name = body["metadata"]["name"]
    assert f"created PyTorchJob kubeflow/{name}" in result.out
    for line in ("Running", "step 1/3 loss 2.0000", "done: 3 steps", "succeeded"):
        assert line in result.out, result
    assert result.out.index("step 1/3") < result.out.index("succeeded")
    command = body["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0][
        "command"
    ]
    assert command[-4:] == ["--dataset", "/workspace/ds", "--output", "/workspace/run"]


@pytest.mark.integration
def test_a_watch_that_ends_in_410_gone_starts_again_from_a_fresh_get(kube):
    """An API server answers a watch from a compacted resourceVersion with an ERROR event
    holding a 410 Gone Status (k8s.io/apiserver, the watch cache); the launcher starts again
    from a fresh GET instead of failing or missing the job's end."""
    kube.scenario = OK_SCENARIO
    kube.gone_watches = 2
    result = run_cli(*TRAIN, env=kube.env)
    assert result.code == 0, result
    assert kube.gone_watches == 0 and "succeeded" in result.out
    gets = [p for m, p, _ in kube.requests if m == "GET" and "/pytorchjobs/kt-" in p]
    watches = [p for m, p, _ in kube.requests if m == "GET" and "watch=" in p]
    assert len(watches) >= 3 and len(gets) >= 3, (gets, watches)
    assert "410" not in result.err and "Expired" not in result.err


@pytest.mark.integration
def test_a_job_name_the_training_operator_refuses_is_refused_before_it_is_sent(kube):
    """The Training Operator's webhook takes DNS-1035 names only; a KFP step's KUBETUNE_JOB_NAME
    starting with a digit is refused here, and the fake refuses it as the webhook does."""
    result = run_cli(*TRAIN, env={**kube.env, "KUBETUNE_JOB_NAME": "7b-run"})
    assert_user_error(result, "KUBETUNE_JOB_NAME must be a DNS-1035 label", "'7b-run'")
    assert kube.count("POST") == 0
    job = render(TINY_DEMO, "distributed.backend=pytorchjob", extra=("--name", "b7-run"))
    job["metadata"]["name"] = "7b-run"
    assert "should match: a DNS-1035 label" in pytorchjob_webhook_errors(job)[0]


@pytest.mark.integration
def test_failure_reason_is_surfaced(kube):
    kube.scenario = [
        (0.1, "Created", "", ""),
        (0.2, "Running", "", ""),
        (0.2, "Restarting", "PyTorchJobRestarting", "pod kt-x-master-0 exited with code 137"),
        (
            0.2,
            "Failed",
            "PyTorchJobFailed",
            "PyTorchJob kt-x is failed because 1 Master replica(s) failed.",
        ),
    ]
    result = run_cli(*TRAIN, env=kube.env)
    assert result.code == 1, result
    assert "exited with code 137" in result.out
    assert (
        "failed: PyTorchJobFailed: PyTorchJob kt-x is failed because 1 Master replica(s) failed."
        in result.err
    )


@pytest.mark.integration
def test_cancel_deletes_the_job(kube):
    kube.scenario = OK_SCENARIO[:3]  # stays Running
    proc = start(kube)
    wait_for(lambda: kube.jobs and sum("/log?" in p for _, p, _ in kube.requests) >= 1)
    wait_for(lambda: kube.count("GET") > 0 and any("watch=" in p for _, p, _ in kube.requests))
    name = next(iter(kube.jobs))
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, (out, err)
    assert f"SIGTERM: deleting PyTorchJob kubeflow/{name}" in err
    assert kube.jobs == {} and kube.count("DELETE", f"/pytorchjobs/{name}") == 1


@pytest.mark.integration
def test_a_retry_adopts_the_running_job(kube):
    kube.scenario = OK_SCENARIO[:3]
    first = start(kube)
    wait_for(lambda: any("watch=" in p for _, p, _ in kube.requests) and kube.jobs)
    first.kill()  # the launcher's pod dies; the job keeps running
    first.communicate(timeout=30)
    name = next(iter(kube.jobs))
    second = start(kube)
    wait_for(lambda: sum("watch=" in p for _, p, _ in kube.requests) >= 2)
    kube.set_condition(name, "Succeeded")
    out, err = second.communicate(timeout=60)
    assert second.returncode == 0, (out, err)
    assert kube.count("POST") == 1  # no second job
    assert f"PyTorchJob kubeflow/{name} already exists (Running): watching it" in out


@pytest.mark.integration
def test_a_failed_job_is_replaced_on_retry(kube):
    kube.scenario = [(0.1, "Failed", "PyTorchJobFailed", "out of memory")]
    assert run_cli(*TRAIN, env=kube.env).code == 1
    kube.scenario = OK_SCENARIO
    again = run_cli(*TRAIN, env=kube.env)
    assert again.code == 0, again
    assert "failed before; deleting it and starting again" in again.out
    assert kube.count("POST") == 2 and kube.count("DELETE") == 1


@pytest.mark.integration
def test_api_errors_are_retried_then_reported(kube):
    kube.scenario = OK_SCENARIO
    kube.failures = {"POST": [503, 500]}
    result = run_cli(*TRAIN, env=kube.env)
    assert result.code == 0, result
    assert result.err.count("HTTP 5") == 2 and kube.count("POST") == 3

    kube.failures = {"GET": [500] * 10}
    broken = run_cli(
        *TRAIN, "--set", "kubernetes.namespace=kubeflow", "--set", "train.seed=7", env=kube.env
    )
    assert_user_error(broken, "Kubernetes API error HTTP 500")
    assert kube.failures["GET"] == [500] * 6  # exactly KUBETUNE_API_ATTEMPTS=4 tries

    kube.failures = {"POST": [403]}
    forbidden = run_cli(*TRAIN, "--set", "train.seed=8", env=kube.env)
    assert_user_error(forbidden, "refused it (HTTP 403", "Role")

    env = {**kube.env, "KUBECONFIG": "/nonexistent/kubeconfig"}
    assert_user_error(run_cli(*TRAIN, env=env), "no Kubernetes configuration")


def master_pod(job: dict, workspace: Path) -> tuple[list[str], dict[str, str]]:
    """The Master pod's exact command and environment as this machine runs them: the workspace
    moved to a local folder, and the PET_* variables the Training Operator sets."""
    from .s3server import free_port

    container = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
    env = {
        e["name"]: e["value"].replace("/workspace", str(workspace))
        for e in container["env"]
        if "value" in e
    }
    env.update(
        PATH=os.environ["PATH"],
        HF_HUB_OFFLINE="1",
        KUBETUNE_CACHE=os.environ["KUBETUNE_CACHE"],
        PET_NNODES="1",
        PET_NPROC_PER_NODE=job["spec"]["nprocPerNode"],
        PET_NODE_RANK="0",
        PET_MASTER_ADDR="127.0.0.1",
        PET_MASTER_PORT=str(free_port()),
    )
    command = [a.replace("/workspace", str(workspace)) for a in container["command"]]
    command[0] = str(Path(KUBETUNE).parent / "python")
    return command, env


@pytest.mark.integration
def test_the_pod_command_trains_with_the_operators_environment(tmp_path, tiny_dataset):
    """Run the Master pod's exact command here, with the PET_* variables the Training Operator
    sets and the job's own environment (the workspace moved to a temp folder), and the trainer
    status endpoint Kubeflow Trainer injects into a TrainJob's pods: rank 0 reports its
    progress there, the figures of its last log line."""
    from .status_server import StatusServer

    (tmp_path / "trainer").mkdir()
    status = StatusServer(tmp_path / "trainer")

    dataset = tmp_path / "workspace" / "ds"
    dataset.parent.mkdir()
    dataset.symlink_to(tiny_dataset, target_is_directory=True)
    job = render(
        TINY_DEMO,
        "train.max_steps=4",
        "train.logging_steps=1",
        extra=("--dataset", "/workspace/ds"),
    )
    command, env = master_pod(job, tmp_path / "workspace")
    env.update(status.env())
    try:
        proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    finally:
        status.close()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    output = Path(command[command.index("--output") + 1])
    metrics = yaml.safe_load((output / "metrics.json").read_text())
    assert metrics["steps"] == 4 and metrics["world_size"] == 2
    # step 1's figures, then at most one per 5 s, and step 4's (forced) last
    assert 2 <= len(status.posts) <= 4, status.posts
    assert status.posts[0]["body"]["trainerStatus"]["metrics"][2]["value"] == "1/4"
    last = status.posts[-1]["body"]["trainerStatus"]
    assert last["progressPercentage"] == 100 and last["estimatedRemainingSeconds"] == 0
    sent = {m["name"]: m["value"] for m in last["metrics"]}
    assert sent["step"] == "4/4" and sent["loss"] == f"{metrics['loss'][-1][1]:.4f}"
    line = f"step 4/4 loss {sent['loss']} "
    (logged,) = [x for x in proc.stdout.splitlines() if x.startswith(line)]
    assert f"tokens/s {sent['tokens_per_second']} progress 100% eta 0s" in logged


STALLING = [
    (0.2, "Created", "", ""),
    (0.3, "Running", "", ""),
    (0.3, "log", "step 1/300 loss 2.0000", ""),
    (0.1, "log", "step 2/300 loss 1.9000", ""),
]  # then nothing: rank 0 stops printing while the job stays Running


@pytest.mark.integration
def test_a_job_whose_log_stops_moving_is_reported_stalled_and_deleted_if_asked(kube):
    """kubernetes.stall_minutes=0.05 (3 s) of silence from rank 0 while the job runs: reported
    once with the last line; with delete_stalled the job is deleted and the step fails."""
    kube.scenario = STALLING
    proc = start(kube, [*TRAIN, "--set", "kubernetes.stall_minutes=0.05"])
    wait_for(lambda: any("/log?" in p for _, p, _ in kube.requests))
    time.sleep(6)
    assert proc.poll() is None, "a stalled job is watched on without delete_stalled"
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert out.count("stalled: rank 0 printed nothing for") == 1, out
    assert "its last line: 'step 2/300 loss 1.9000'" in out and "Still watching it" in out
    kube.scenario = STALLING
    result = run_cli(
        *TRAIN, "--set", "kubernetes.stall_minutes=0.05", "--set", "kubernetes.delete_stalled=true",
        env=kube.env,
    )  # fmt: skip
    assert_user_error(
        result, "stalled: rank 0 printed nothing for", "(kubernetes.stall_minutes=0.05)",
        "It was deleted (kubernetes.delete_stalled)",
    )  # fmt: skip
    assert kube.count("DELETE") == 2 and kube.jobs == {}  # the cancelled one, the stalled one
