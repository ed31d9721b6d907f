"""Kueue: jobs rendered for a queue (label, created suspended, priorities) against the CRDs and
the upstream API models, and the launcher against a loopback API server that plays Kueue's part
(tests/fake_k8s.py): queued → admitted → succeeded, queued past the timeout, and a preemption
with a real torchrun worker killed and started again from its checkpoint."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
from pathlib import Path

import pytest

from .conftest import TINY_DEMO, assert_user_error, run_cli
from .fake_k8s import KUEUE_FRAMEWORKS, shipped_runtime
from .k8s_schemas import (
    crd_errors,
    pod_template_errors,
    pytorchjob_api_errors,
    trainer_api_errors,
    trainjob_pod,
)
from .test_kubernetes import TRAIN, fake_kube, master_pod, render, start, wait_for

QUEUE = ("kubernetes.queue=gpu-queue",)
PRIORITIES = (
    "kubernetes.priority_class=training-high",
    "kubernetes.workload_priority_class=research",
)


def test_a_queued_pytorchjob_is_suspended_with_kueue_labels_and_priorities():
    job = render(
        TINY_DEMO, *QUEUE, *PRIORITIES, "distributed.nodes=2", "distributed.backend=pytorchjob"
    )
    assert crd_errors(job) == [] and pytorchjob_api_errors(job) == []
    labels = job["metadata"]["labels"]
    assert labels["kueue.x-k8s.io/queue-name"] == "gpu-queue"
    assert labels["kueue.x-k8s.io/priority-class"] == "research"
    policy = job["spec"]["runPolicy"]
    assert policy["suspend"] is True
    assert policy["schedulingPolicy"] == {"priorityClass": "training-high"}
    for replica in job["spec"]["pytorchReplicaSpecs"].values():
        assert replica["template"]["spec"]["priorityClassName"] == "training-high"
        assert pod_template_errors(replica["template"]) == []
    # the models' round trip catches a field the Operator's API does not have
    import copy

    typo = copy.deepcopy(job)
    typo["spec"]["runPolicy"]["suspended"] = typo["spec"]["runPolicy"].pop("suspend")
    assert pytorchjob_api_errors(typo) == ["spec.runPolicy.suspended: not in the API (dropped)"]
    plain = render(TINY_DEMO)
    assert "suspend" not in plain["spec"]["runPolicy"]
    assert not any(k.startswith("kueue.x-k8s.io/") for k in plain["metadata"]["labels"])


def test_a_queued_trainjob_is_suspended_with_kueue_labels_and_priorities():
    job = render(TINY_DEMO, *QUEUE, PRIORITIES[1], extra=("--kind", "trainjob"))
    assert trainer_api_errors(job) == []  # Trainer v2.3's models keep every field
    assert job["spec"]["suspend"] is True
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
    assert job["metadata"]["labels"]["kueue.x-k8s.io/priority-class"] == "research"
    assert pod_template_errors(trainjob_pod(shipped_runtime(), job)) == []
    # a pod PriorityClass lives in the runtime: runtimePatches cannot carry it
    refused = run_cli("render-job", TINY_DEMO, "--kind", "trainjob", "--set", PRIORITIES[0])
    assert_user_error(refused, "cannot set its pods' priorityClassName", "--kind runtime")
    runtime = render(
        TINY_DEMO, PRIORITIES[0], "kubernetes.runtime=kubetune-high", extra=("--kind", "runtime")
    )
    assert trainer_api_errors(runtime) == []
    job = render(TINY_DEMO, "kubernetes.runtime=kubetune-high", extra=("--kind", "trainjob"))
    pod = trainjob_pod(runtime, job)
    assert pod["spec"]["priorityClassName"] == "training-high"
    assert pod_template_errors(pod) == []


def test_queue_settings_are_checked():
    no_queue = run_cli("render-job", TINY_DEMO, "--set", "kubernetes.workload_priority_class=x")
    assert_user_error(no_queue, "kubernetes.workload_priority_class", "needs kubernetes.queue")
    bad = run_cli("render-job", TINY_DEMO, "--set", "kubernetes.queue=GPU_Queue")
    assert_user_error(bad, "kubernetes.queue")
    never = run_cli("render-job", TINY_DEMO, "--set", "kubernetes.queue_timeout_seconds=0")
    assert_user_error(never, "kubernetes.queue_timeout_seconds")


# --- the launcher and Kueue ------------------------------------------------------------------


@pytest.fixture(params=["pytorchjob", "trainjob"])
def any_kube(request, tmp_path):
    yield from fake_kube(tmp_path, request.param)


def queued_train(kind: str, *sets: str) -> list[str]:
    args = [a for s in (*QUEUE, f"distributed.backend={kind}", *sets) for a in ("--set", s)]
    return [*TRAIN[:-2], *args]


@pytest.mark.integration
def test_queued_then_admitted_then_succeeds(any_kube):
    """Driven by what the launcher says, not by the clock: Kueue admits the job only once the
    launcher has reported it queued, has found its Workload and has reported the wait at least
    once; the figures it prints are then checked against each other."""
    kind = any_kube.kind["kind"]
    done = "Succeeded" if kind == "PyTorchJob" else "Complete"
    any_kube.scenario = []
    any_kube.env.update(KUBETUNE_QUEUE_REPORT="0.5", KUBETUNE_PICKUP_POLL="0.5")
    launcher = Lines(start(any_kube, queued_train(kind.lower())))
    launcher.wait_for("made for it")
    launcher.wait_for(") for ")  # a "queued ... for N s" report
    (name,) = any_kube.jobs
    any_kube.suspend(name, False)  # Kueue admits it
    launcher.wait_for("admitted after")
    any_kube.set_condition(name, "Running" if kind == "PyTorchJob" else "pod")
    any_kube.log(name, "step 1/2 loss 2.0000")
    launcher.wait_for("step 1/2")
    any_kube.set_condition(name, done)
    code, out = launcher.finish()
    assert code == 0, out
    assert any_kube.invalid == [] and any_kube.count("POST") == 1
    where = f"{kind} kubeflow/{name}"
    assert f"{where}: queued (waiting for quota in gpu-queue)" in out
    waits = [int(w) for w in re.findall(rf"{where}: queued \(waiting for quota in gpu-queue\) "
                                        r"for (\d+) s", out)]  # fmt: skip
    (admitted,) = re.findall(rf"{where}: admitted after (\d+) s \(Kueue queue gpu-queue\)", out)
    assert waits and waits == sorted(waits) and int(admitted) >= waits[-1], out
    assert out.index("queued") < out.index("admitted") < out.index("step 1/2")
    assert "succeeded" in out and "preempted" not in out
    (workload,) = any_kube.workloads  # Kueue's, found by the job's uid
    assert f"{where}: Kueue Workload {workload} made for it" in out
    assert out.index("made for it") < out.index("admitted")


class Lines:
    """A running launcher's output, read as it comes, so a test can wait for what it says."""

    def __init__(self, proc: subprocess.Popen):
        self.proc, self.lines = proc, []
        self.changed = threading.Condition()

        def pump():
            for line in proc.stdout:
                with self.changed:
                    self.lines.append(line)
                    self.changed.notify_all()

        threading.Thread(target=pump, daemon=True).start()

    def wait_for(self, text: str, timeout: float = 120) -> None:
        with self.changed:
            found = self.changed.wait_for(
                lambda: any(text in line for line in self.lines) or self.proc.poll() is not None,
                timeout,
            )
        assert found and any(text in line for line in self.lines), (text, "".join(self.lines))

    def finish(self) -> tuple[int, str]:
        code = self.proc.wait(timeout=120)
        err = self.proc.stderr.read()
        return code, "".join(self.lines) + err


@pytest.mark.integration
def test_a_job_kueue_does_not_manage_fails_fast_saying_what_to_do(any_kube):
    """Kueue v0.19+ no longer enables kubeflow.org/pytorchjob by default: a queued PyTorchJob
    then gets no Workload and would wait suspended until the queue timeout (a day). The
    launcher looks for the job's Workload and gives up after kubernetes.queue_pickup_seconds
    with one line, deleting the job that nothing would ever start."""
    kind = any_kube.kind["kind"]
    any_kube.kueue = {f for k, f in KUEUE_FRAMEWORKS.items() if k != kind}  # this one is off
    args = queued_train(kind.lower(), "kubernetes.queue_pickup_seconds=2")
    env = {**any_kube.env, "KUBETUNE_QUEUE_REPORT": "0.5", "KUBETUNE_PICKUP_POLL": "0.5"}
    result = run_cli(*args, env=env)
    framework = KUEUE_FRAMEWORKS[kind]
    other = "distributed.backend=trainjob" if kind == "PyTorchJob" else "TrainJob integration"
    assert_user_error(
        result,
        "Kueue made no Workload for it (kubernetes.queue_pickup_seconds=2)",
        f"Add {framework} to integrations.frameworks",
        other,
        "was deleted",
    )
    assert any_kube.jobs == {} and any_kube.count("DELETE") == 1 and any_kube.workloads == {}
    looks = [p for m, p, _ in any_kube.requests if m == "GET" and "/workloads?" in p]
    assert len(looks) >= 2 and all("kueue.x-k8s.io%2Fjob-uid%3D" in p for p in looks), looks


@pytest.fixture
def queue_kube(tmp_path):
    yield from fake_kube(tmp_path)


@pytest.mark.integration
def test_a_queue_without_kueue_fails_at_once(queue_kube):
    kube = queue_kube
    kube.kueue = None  # the API server has no kueue.x-k8s.io Workloads
    result = run_cli(*queued_train("pytorchjob"), env=kube.env)
    assert_user_error(
        result, "no kueue.x-k8s.io/v1beta2 Workloads", "Kueue v0.17+ is not installed"
    )
    assert kube.jobs == {}


@pytest.mark.integration
def test_a_role_that_cannot_list_workloads_is_named(queue_kube):
    """The fake API server answers as RBAC would for the Role it is given."""
    kube = queue_kube
    kube.rules = [r for r in kube.rules if "workloads" not in r["resources"]]
    kube.expect_forbidden = True
    result = run_cli(*queued_train("pytorchjob"), env=kube.env)
    assert_user_error(
        result,
        "list Kueue workloads of",
        "HTTP 403",
        'cannot list resource "workloads" in API group "kueue.x-k8s.io"',
        "manifests/base/rbac.yaml",
    )
    assert kube.forbidden == [("kueue.x-k8s.io", "workloads", "list")]


@pytest.mark.integration
def test_queued_past_the_timeout_is_an_error_that_keeps_the_job(any_kube):
    kind = any_kube.kind["kind"]
    any_kube.env["KUBETUNE_JOB_NAME"] = "kt-queued"  # the KFP step's: the same on its retry
    args = queued_train(kind.lower(), "kubernetes.queue_timeout_seconds=2")
    any_kube.scenario = []
    result = run_cli(*args, env=any_kube.env)
    assert_user_error(
        result,
        "without being admitted (kubernetes.queue_timeout_seconds=2)",
        "Kueue queue gpu-queue",
        "was not deleted",
    )
    (name,) = any_kube.jobs  # still queued, not deleted
    assert any_kube.count("DELETE") == 0
    # the step's retry adopts the queued job: no second one
    watches = sum("watch=" in p for _, p, _ in any_kube.requests)
    retry = start(any_kube, queued_train(kind.lower(), "kubernetes.queue_timeout_seconds=600"))
    wait_for(lambda: sum("watch=" in p for _, p, _ in any_kube.requests) > watches)
    any_kube.suspend(name, False)
    any_kube.set_condition(name, "Succeeded" if kind == "PyTorchJob" else "Complete")
    out, err = retry.communicate(timeout=60)
    assert retry.returncode == 0, (out, err)
    assert any_kube.count("POST") == 1
    assert f"{kind} kubeflow/{name} already exists (Suspended): watching it" in out
    assert "admitted after" in out


class Pod:
    """What the kubelet runs for the PyTorchJob's Master pod: its exact command and
    environment (the workspace moved to a temp folder), the PET_* variables the Training
    Operator sets, and its output as the pod's log on the fake API server."""

    def __init__(self, kube, name: str, workspace: Path):
        command, env = master_pod(kube.jobs[name], workspace)
        kube.start_pod(name)
        self.proc = subprocess.Popen(
            command,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.lines: list[str] = []

        def pump():
            for line in self.proc.stdout:
                self.lines.append(line.rstrip("\n"))
                kube.log(name, line.rstrip("\n"))

        self.pump = threading.Thread(target=pump, daemon=True)
        self.pump.start()

    def delete(self) -> int:
        """The kubelet's SIGTERM to the pod's processes (a grace period, then SIGKILL)."""
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            return self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.wait()


@pytest.mark.integration
def test_preempted_then_readmitted_resumes_from_its_checkpoint(
    tmp_path, tiny_dataset, tiny_adapter
):
    """Kueue admits the job, preempts it (suspends it again: the pod is deleted while a real
    torchrun worker trains) and admits it again: the new pod resumes from the last checkpoint
    and the run ends with the steps and losses of an uninterrupted run (tiny_adapter: the same
    recipe, 24 steps)."""
    gen = fake_kube(tmp_path)
    kube = next(gen)
    try:
        workspace = tmp_path / "workspace"
        workspace.mkdir()
        (workspace / "ds").symlink_to(tiny_dataset, target_is_directory=True)
        kube.scenario = []
        launcher = start(
            kube, queued_train("pytorchjob", "train.max_steps=24", "train.save_steps=5")
        )
        wait_for(lambda: kube.jobs)
        (name,) = kube.jobs
        assert kube.jobs[name]["spec"]["runPolicy"]["suspend"] is True
        wait_for(lambda: sum("watch=" in p for _, p, _ in kube.requests) >= 1)

        kube.suspend(name, False)  # admitted
        first = Pod(kube, name, workspace)
        checkpoints = workspace / "run" / "checkpoints"
        wait_for(lambda: list(checkpoints.glob("step-*/trainer_state.json")), timeout=300)
        kube.suspend(name, True)  # preempted: Kueue evicts it, the pods are deleted
        assert first.delete() != 0, "\n".join(first.lines)
        assert not (workspace / "run" / "metrics.json").exists()

        kube.suspend(name, False)  # admitted again
        second = Pod(kube, name, workspace)
        assert second.proc.wait(timeout=300) == 0, "\n".join(second.lines)
        second.pump.join(timeout=10)
        kube.set_condition(name, "Succeeded")
        out, err = launcher.communicate(timeout=60)
    finally:
        for _ in gen:
            pass
    assert launcher.returncode == 0, (out, err)
    where = f"PyTorchJob kubeflow/{name}"
    assert out.count(f"{where}: queued (waiting for quota in gpu-queue)") == 2, out
    assert f"{where}: preempted (suspended again, Kueue queue gpu-queue)" in out
    assert out.count(f"{where}: admitted after") == 2
    assert out.index("preempted") < out.index("resuming from"), out
    metrics = json.loads((workspace / "run" / "metrics.json").read_text())
    straight = json.loads((tiny_adapter / "metrics.json").read_text())
    assert metrics["resumed_from_step"] >= 5 and metrics["steps"] == straight["steps"] == 24
    assert [s for s, _ in metrics["loss"]] == list(range(1, 25))
    for (step, a), (_, b) in zip(straight["loss"], metrics["loss"], strict=True):
        assert a == pytest.approx(b, abs=1e-5), step
