"""The `pytorchjob` and `trainjob` backends of `kubetune train`: run the worker as a Kubeflow
PyTorchJob (Training Operator v1) or TrainJob (Trainer v2); one launcher, a `JobKind` apart.

create (or adopt) → watch the job's conditions → stream rank 0's log → return when it ends:
exit 0 when it Succeeded (a TrainJob: Complete), 1 with the controller's reason and message when
it Failed. A job in a Kueue queue (created suspended, `kubernetes.queue`) is reported as
queued, with the time it has waited, until Kueue admits it, for at most
`kubernetes.queue_timeout_seconds`; one that Kueue suspends again after it ran was preempted,
and when it is admitted again its pods resume from the last checkpoint. SIGTERM or
SIGINT (a cancelled KFP run, Ctrl-C) deletes the job. The job name is a pure function of the run
(`KUBETUNE_JOB_NAME`, which the KFP step sets from the run and task, or a digest of the recipe
and paths), so a retried step finds the job it already created and watches it instead of
starting a second one; a job that already Failed is deleted and created again (training
resumes from its checkpoints on the workspace volume). API calls are retried a bounded number
of times on 429/5xx and connection errors.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import PurePosixPath

from ..config import RunConfig, dump_config
from ..console import duration
from ..errors import UserError
from ..k8s_values import check_job_name
from . import pytorchjob, trainjob
from .kube_api import (
    Conflict,
    JobApi,
    JobKind,
    LogFollower,
    api_attempts,
    api_backoff,
    job_state,
)
from .pod import QUEUE_LABEL, hashed_job_name
from .stall import Stall, Stalled
from .taskconfig import JOB_NAME_ENV, TaskConfig


def _pytorchjob_lead(job: dict) -> str:
    name = job["metadata"]["name"]
    return (
        f"training.kubeflow.org/job-name={name},"
        f"training.kubeflow.org/replica-type={pytorchjob.lead_replica(job)},"
        "training.kubeflow.org/replica-index=0"
    )


PYTORCHJOB = JobKind(
    kind=pytorchjob.KIND,
    group=pytorchjob.GROUP,
    version=pytorchjob.VERSION,
    plural=pytorchjob.PLURAL,
    container=pytorchjob.CONTAINER,
    success="Succeeded",
    conditions=("Created", "Running", "Restarting", "Succeeded", "Failed", "Suspended"),
    render=pytorchjob.render_job,
    lead_selector=_pytorchjob_lead,
    operator="the Kubeflow Training Operator",
    suspend=("runPolicy", "suspend"),
    kueue_framework="kubeflow.org/pytorchjob",
)
TRAINJOB = JobKind(
    kind=trainjob.KIND,
    group=trainjob.GROUP,
    version=trainjob.VERSION,
    plural=trainjob.PLURAL,
    container=trainjob.NODE,
    success="Complete",
    conditions=("Created", "Suspended", "Complete", "Failed"),
    render=trainjob.render_trainjob,
    lead_selector=lambda job: trainjob.lead_pod_selector(job["metadata"]["name"]),
    operator="Kubeflow Trainer v2",
    suspend=("suspend",),
    kueue_framework="trainer.kubeflow.org/trainjob",
)


class KubernetesBackend:
    """The `pytorchjob` and `trainjob` backends: `launch` with their JobKind."""

    local = False

    def __init__(self, kind: JobKind):
        self.kind = kind
        self.name = kind.kind.lower()

    def launch(
        self,
        cfg: RunConfig,
        dataset: str,
        output: str,
        task: TaskConfig | None = None,
        job_name: str | None = None,
    ) -> int:
        return launch(cfg, dataset, output, task, self.kind, job_name)


def job_kind(cfg: RunConfig) -> JobKind:
    return TRAINJOB if cfg.distributed.backend == "trainjob" else PYTORCHJOB


class Cancelled(Exception):
    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def check_paths(cfg: RunConfig, dataset: str, output: str) -> None:
    mount = PurePosixPath(cfg.kubernetes.workspace_mount)
    for flag, value in (("--dataset", dataset), ("--output", output)):
        path = PurePosixPath(value)
        if not path.is_absolute() or mount not in (path, *path.parents):
            raise UserError(
                f"{flag} {value}: with distributed.backend={cfg.distributed.backend} it is a path "
                "inside the "
                f"pods, on the workspace volume (under {mount})"
            )


def default_job_name(cfg: RunConfig, dataset: str, output: str, given: str | None = None) -> str:
    """`given` (the KFP task's, or KUBETUNE_JOB_NAME's on a command line), checked; else a
    digest of the recipe and paths."""
    if given:
        try:
            return check_job_name(given, JOB_NAME_ENV, cfg.distributed.nodes)
        except ValueError as exc:
            raise UserError(str(exc)) from None
    model = cfg.model.name_or_path.rstrip("/").split("/")[-1]
    return hashed_job_name(f"{model}-{cfg.method}", f"{dump_config(cfg)}\n{dataset}\n{output}")


def launch(
    cfg: RunConfig,
    dataset: str,
    output: str,
    task: TaskConfig | None,
    kind: JobKind,
    job_name: str | None = None,
) -> int:
    """Run training as a `kind` job (PyTorchJob or TrainJob) and wait for it; the exit code
    (0 when it succeeded, 1 when it failed). `task`: what the KFP train task passes through
    (None: nothing)."""
    check_paths(cfg, dataset, output)
    name = default_job_name(cfg, dataset, output, job_name)
    namespace = cfg.kubernetes.namespace
    assert kind.render is not None, "a training job kind renders its job"
    job = kind.render(cfg, name, dataset, output, task or TaskConfig())
    api = JobApi(namespace, kind)
    where = f"{kind.kind} {namespace}/{name}"

    def cancel(signum, _frame):
        raise Cancelled(signum)

    previous = {s: signal.signal(s, cancel) for s in (signal.SIGTERM, signal.SIGINT)}
    follower, cancelled = None, False
    try:
        existing = api.get(name)
        if existing is not None and job_state(existing, kind)[0] == "Failed":
            print(f"{where} failed before; deleting it and starting again", flush=True)
            api.delete(name)
            wait_gone(api, name)
            existing = None
        if existing is None:
            try:
                existing = api.create(job)
                print(f"created {where}", flush=True)
            except Conflict:
                existing = api.get(name)
                print(f"{where} already exists: watching it", flush=True)
        else:
            print(
                f"{where} already exists ({job_state(existing, kind)[0]}): watching it", flush=True
            )
        follower = LogFollower(api, name, kind.lead_selector(job))
        follower.start()
        queue = Admission(
            where,
            cfg.kubernetes.queue_timeout_seconds,
            kind,
            pickup=cfg.kubernetes.queue_pickup_seconds,
            workloads=api.workloads,
        )
        k8s = cfg.kubernetes
        stall = Stall(where, k8s.stall_minutes, k8s.delete_stalled, follower)
        state, reason, message = wait(api, name, where, queue, stall)
    except (NotPickedUp, Stalled):
        cancelled = True  # no last lines to wait for
        api.delete(name)  # it would wait suspended forever, or it is stuck
        raise
    except Cancelled as exc:
        cancelled = True
        print(f"{exc}: deleting {where}", file=sys.stderr, flush=True)
        for s, handler in previous.items():
            signal.signal(s, handler)
        api.delete(name)
        return 128 + exc.signum
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if follower is not None:
            follower.stop.set()
            follower.join(timeout=0 if cancelled else 15)  # let the last lines arrive
    if state == kind.success:
        print(f"{where} succeeded", flush=True)
        return 0
    detail = ": ".join(x for x in (reason, message) if x)
    print(f"{where} {state.lower()}{': ' + detail if detail else ''}", file=sys.stderr, flush=True)
    return 1


def wait_gone(api: JobApi, name: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while api.get(name) is not None:
        if time.monotonic() > deadline:
            raise UserError(f"{api.kind.kind} {name} was not deleted within {timeout:.0f} s")
        time.sleep(1)


def _minutes(seconds: float) -> str:
    return duration(seconds, seconds_unit=" s")


class NotPickedUp(UserError):
    """Kueue made no Workload for a queued job: nothing will ever admit it."""


class Admission:
    """Kueue's side of a job: queued (suspended, waiting for quota) → admitted → maybe
    preempted (suspended again) → admitted again. Reports each change, and how long the job
    has waited every `every` seconds; a wait longer than `timeout` is an error that leaves the
    job in its queue.

    A queued job is admitted only through the Workload Kueue makes for it, and Kueue makes one
    only for the kinds whose integration its Configuration enables (`integrations.frameworks`;
    from v0.19 `kubeflow.org/pytorchjob` is no longer on by default). So until the job's
    Workload exists (`workloads(uid)`, looked up every few seconds) the wait is bounded by
    `pickup`: past it the job is one that no Kueue will ever admit, and NotPickedUp says why."""

    def __init__(
        self,
        where: str,
        timeout: float,
        kind: JobKind,
        every: float | None = None,
        pickup: float = float("inf"),
        workloads: Callable[[str], list[dict] | None] | None = None,
    ):
        self.where, self.timeout, self.kind = where, timeout, kind
        self.every = (
            every if every is not None else float(os.environ.get("KUBETUNE_QUEUE_REPORT", "60"))
        )
        self.since: float | None = None  # when this launcher saw it suspended
        self.reported = 0.0
        self.ran = False  # seen admitted while this launcher watched
        self.pickup, self.workloads = pickup, workloads
        self.poll = float(os.environ.get("KUBETUNE_PICKUP_POLL", "5"))  # between looks
        self.picked = workloads is None  # its Workload seen (or not looked for)
        self.looked = -math.inf  # when it last looked for the Workload

    def check_pickup(self, job: dict, queue: str | None, now: float) -> None:
        """Called while the job is queued (self.since set). Until Kueue has the job, it was
        never admitted, so self.since is when this launcher first saw it queued."""
        if self.picked or queue is None or self.workloads is None or self.since is None:
            return
        waited = now - self.since
        if now - self.looked < self.poll and waited <= self.pickup:
            return
        self.looked = now
        meta = job.get("metadata") or {}
        found = self.workloads(meta.get("uid", ""))
        namespace = meta.get("namespace", "")
        if found is None:
            raise NotPickedUp(
                f"{self.where} is in Kueue queue {queue}, but the API server has no "
                "kueue.x-k8s.io/v1beta2 Workloads: Kueue v0.17+ is not installed, so nothing "
                "would ever admit it. It was deleted; install Kueue or unset kubernetes.queue"
            )
        if found:
            self.picked = True
            print(
                f"{self.where}: Kueue Workload {found[0]['metadata']['name']} made for it",
                flush=True,
            )
            return
        if waited > self.pickup:
            other = (
                "distributed.backend=trainjob (Kueue v0.17+)"
                if self.kind.kind != "TrainJob"
                else "a Kueue with the TrainJob integration"
            )
            raise NotPickedUp(
                f"{self.where} waited {_minutes(waited)} in Kueue queue {queue} and "
                f"Kueue made no Workload for it (kubernetes.queue_pickup_seconds="
                f"{self.pickup:g}): Kueue does not manage {self.kind.kind}s here. Add "
                f"{self.kind.kueue_framework} to integrations.frameworks in Kueue's "
                f"Configuration (off by default from Kueue v0.19), or use {other}. The "
                f"{self.kind.kind} was deleted (`kubectl get workloads -n {namespace}` lists "
                "what Kueue does manage)"
            )

    def suspended(self, job: dict) -> bool:
        node = job.get("spec") or {}
        for key in self.kind.suspend:
            node = node.get(key) if isinstance(node, dict) else None
        return node is True

    def observe(self, job: dict) -> None:
        now = time.monotonic()
        queue = ((job.get("metadata") or {}).get("labels") or {}).get(QUEUE_LABEL)
        where = f"Kueue queue {queue}" if queue else "no Kueue queue label"
        if not self.suspended(job):
            if self.since is not None:
                print(
                    f"{self.where}: admitted after {_minutes(now - self.since)} ({where})",
                    flush=True,
                )
            self.since, self.ran, self.picked = None, True, True  # admitted: Kueue has it
            return
        if self.since is None:
            self.since = self.reported = now
            if self.ran:
                print(
                    f"{self.where}: preempted (suspended again, {where}); its pods are gone, "
                    "and it resumes from its last checkpoint when it is admitted again",
                    flush=True,
                )
            print(f"{self.where}: queued (waiting for quota in {queue or 'its queue'})", flush=True)
        elif now - self.reported >= self.every:
            self.reported = now
            print(
                f"{self.where}: queued (waiting for quota in {queue or 'its queue'}) for "
                f"{_minutes(now - self.since)}",
                flush=True,
            )
        self.check_pickup(job, queue, now)
        if now - self.since > self.timeout:
            raise UserError(
                f"{self.where} waited {_minutes(now - self.since)} in {where} without being "
                f"admitted (kubernetes.queue_timeout_seconds={self.timeout:g}). It is still "
                "queued and was not deleted: `kubectl get workloads -n "
                f"{job['metadata'].get('namespace', '')}` says why it waits; run again to "
                "keep waiting for it, or delete it"
            )

    def left(self) -> int | None:
        """Seconds until the next report or the queue timeout, while queued (the watch wakes
        up for them)."""
        if self.since is None:
            return None
        now = time.monotonic()
        due = self.reported + self.every - now
        if self.timeout != float("inf"):
            due = min(due, self.since + self.timeout - now)
        if not self.picked:
            due = min(due, self.poll)
        return max(1, math.ceil(due))


def wait(
    api: JobApi, name: str, where: str, queue: Admission | None = None, stall: Stall | None = None
) -> tuple[str, str, str]:
    """Watch the job until it Succeeded or Failed (or was deleted by someone else)."""
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    queue = queue or Admission(where, float("inf"), api.kind)
    reported = None
    failures = 0
    while True:
        job = api.get(name)
        if job is None:
            return "Deleted", "", "the job was deleted while it ran"
        queue.observe(job)
        events = [("SNAPSHOT", job)]
        wake = [t for t in (queue.left(), stall.left() if stall else None) if t is not None]
        try:
            events_iter = api.watch(
                name, job["metadata"].get("resourceVersion"), min(wake) if wake else None
            )
            for kind, obj in _chain(events, events_iter):
                if kind == "DELETED":
                    return "Deleted", "", "the job was deleted while it ran"
                if kind == "ERROR":  # e.g. 410 Gone: start again from a fresh GET
                    break
                queue.observe(obj)
                state = job_state(obj, api.kind)
                if stall is not None:
                    stall.check(queue.since is None and state[0] not in api.kind.terminal)
                if state != reported:
                    reported = state
                    if state[0] == "Suspended":  # Admission reports queued and preempted
                        continue
                    line = f"{where}: {state[0]}"
                    if state[0] in ("Restarting", "Failed") and (state[1] or state[2]):
                        line += f" ({': '.join(x for x in state[1:] if x)})"
                    print(line, flush=True)
                if state[0] in api.kind.terminal:
                    return state
            failures = 0
        except (ApiException, HTTPError, OSError) as exc:
            failures += 1
            if failures >= api_attempts():
                raise UserError(
                    f"watching {where}: the Kubernetes API keeps failing ({exc.__class__.__name__})"
                ) from None
            time.sleep(min(api_backoff() * 2**failures, 30.0))


def _chain(first: list, stream):
    yield from first
    for event in stream:
        yield event["type"], event["object"]
