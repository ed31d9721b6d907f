"""The Kubernetes API calls kubetune makes for a custom resource (a PyTorchJob, a TrainJob, a
KServe InferenceService): get, create, delete, watch, rank 0's pod and its log. Each call is
retried a bounded number of times on 429/5xx and connection errors; a refusal becomes a
UserError that says what to check. `JobKind` is what the calls need to know of one kind.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import UserError

RETRYABLE = {429, 500, 502, 503, 504}
KUEUE_GROUP, KUEUE_VERSION = "kueue.x-k8s.io", "v1beta2"  # served from Kueue v0.15
JOB_UID_LABEL = "kueue.x-k8s.io/job-uid"  # on a Workload: its job's uid (Kueue's JobUIDLabel)


@dataclass(frozen=True)
class JobKind:
    """What the launcher needs to know about one kind of training job."""

    kind: str
    group: str
    version: str
    plural: str
    container: str  # rank 0's container, whose log is streamed
    success: str  # the condition that means it finished well
    conditions: tuple[str, ...]  # condition types that are states of the job
    render: Callable[..., dict] | None  # (cfg, name, dataset, output, task) → the job
    lead_selector: Callable[[dict], str]  # the job → label selector of rank 0's pod
    operator: str  # what must be installed for the API to know the kind
    suspend: tuple[str, ...]  # where the job's spec says it is suspended (Kueue's switch)
    kueue_framework: str = ""  # Kueue's integration of the kind (integrations.frameworks)

    @property
    def terminal(self) -> tuple[str, str]:
        return self.success, "Failed"


def api_attempts() -> int:
    return max(1, int(os.environ.get("KUBETUNE_API_ATTEMPTS", "5")))


def api_backoff() -> float:
    return float(os.environ.get("KUBETUNE_API_BACKOFF", "1.0"))


def _watch_timeout() -> int:
    return max(1, int(os.environ.get("KUBETUNE_WATCH_TIMEOUT", "60")))


def job_state(job: dict, kind: JobKind) -> tuple[str, str, str]:
    """(state, reason, message) of the newest true condition; ("Pending", "", "") if none."""
    conditions = [
        c
        for c in (job.get("status") or {}).get("conditions") or []
        if c.get("status") == "True" and c.get("type") in kind.conditions
    ]
    if not conditions:
        return "Pending", "", ""
    terminal = [c for c in conditions if c["type"] in kind.terminal]
    last = terminal[-1] if terminal else conditions[-1]
    return last["type"], last.get("reason") or "", last.get("message") or ""


class JobApi:
    """The few Kubernetes API calls the launcher makes, each retried on transient errors."""

    def __init__(self, namespace: str, kind: JobKind):
        from kubernetes import client, config

        self.kind = kind
        try:
            if os.environ.get("KUBERNETES_SERVICE_HOST"):
                config.load_incluster_config()
            else:
                config.load_kube_config()
        except config.ConfigException as exc:
            raise UserError(
                f"no Kubernetes configuration (in-cluster or KUBECONFIG/~/.kube/config): {exc}"
            ) from None
        self.namespace = namespace
        self.api_client = client.ApiClient()
        self.custom = client.CustomObjectsApi(self.api_client)
        self.core = client.CoreV1Api(self.api_client)
        self.host = self.api_client.configuration.host

    def call(self, what: str, fn, *args, **kwargs):
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        attempts = api_attempts()
        for attempt in range(attempts):
            try:
                return fn(*args, **kwargs)
            except ApiException as exc:
                if exc.status not in RETRYABLE or attempt == attempts - 1:
                    raise self.explain(what, exc) from None
                problem = f"HTTP {exc.status}"
            except (HTTPError, OSError) as exc:
                if attempt == attempts - 1:
                    raise UserError(
                        f"{what}: cannot reach the Kubernetes API at {self.host} after "
                        f"{attempts} attempts ({exc.__class__.__name__})"
                    ) from None
                problem = exc.__class__.__name__
            delay = min(api_backoff() * 2**attempt, 30.0)
            print(f"{what}: {problem}, retrying in {delay:g} s", file=sys.stderr, flush=True)
            time.sleep(delay)
        raise AssertionError("unreachable")

    def explain(self, what: str, exc) -> Exception:
        import json

        try:
            message = json.loads(exc.body).get("message", "")
        except (TypeError, ValueError, AttributeError):
            message = ""
        if exc.status in (401, 403):
            return UserError(
                f"{what}: the Kubernetes API refused it (HTTP {exc.status}{': ' + message if message else ''}); "
                "check the service account's Role (manifests/base/rbac.yaml)"
            )
        if exc.status == 404:
            return NotFound(what)
        if exc.status == 409:
            return Conflict(what)
        if exc.status == 422:
            return UserError(f"{what}: the API server rejected the {self.kind.kind}: {message}")
        return UserError(f"{what}: Kubernetes API error HTTP {exc.status} {message}".rstrip())

    def _where(self) -> tuple[str, str, str, str]:
        return self.kind.group, self.kind.version, self.namespace, self.kind.plural

    def get(self, name: str) -> dict | None:
        try:
            return self.call(
                f"get {self.kind.kind.lower()} {name}",
                self.custom.get_namespaced_custom_object,
                *self._where(),
                name,
            )
        except NotFound:
            return None

    def create(self, job: dict) -> dict:
        try:
            return self.call(
                f"create {self.kind.kind.lower()} {job['metadata']['name']}",
                self.custom.create_namespaced_custom_object,
                *self._where(),
                job,
            )
        except NotFound:
            k = self.kind
            raise UserError(
                f"the API server at {self.host} has no {k.plural}.{k.group}/{k.version} in "
                f"namespace {self.namespace}: is {k.operator} installed?"
            ) from None

    def delete(self, name: str) -> None:
        from kubernetes import client

        with contextlib.suppress(NotFound):
            self.call(
                f"delete {self.kind.kind.lower()} {name}",
                self.custom.delete_namespaced_custom_object,
                *self._where(),
                name,
                body=client.V1DeleteOptions(propagation_policy="Background"),
            )

    def watch(self, name: str, resource_version: str | None, timeout: int | None = None):
        """Events for this job until the server ends the watch (a timeout)."""
        from kubernetes import watch

        stream = watch.Watch().stream(
            self.custom.list_namespaced_custom_object,
            *self._where(),
            field_selector=f"metadata.name={name}",
            resource_version=resource_version,
            timeout_seconds=max(1, min(timeout or _watch_timeout(), _watch_timeout())),
        )
        yield from stream

    def workloads(self, uid: str) -> list[dict] | None:
        """Kueue's Workloads of the job whose uid this is (Kueue labels each one with
        kueue.x-k8s.io/job-uid); None where the API server has no kueue.x-k8s.io/v1beta2
        Workloads (no Kueue v0.15+). A refusal (the Role) is a UserError, as for any call."""
        try:
            found = self.call(
                f"list Kueue workloads of {uid}",
                self.custom.list_namespaced_custom_object,
                KUEUE_GROUP,
                KUEUE_VERSION,
                self.namespace,
                "workloads",
                label_selector=f"{JOB_UID_LABEL}={uid}",
            )
        except NotFound:
            return None
        return list(found.get("items") or [])

    def lead_pod(self, name: str, selector: str) -> dict | None:
        pods = self.call(
            f"list pods of {name}",
            self.core.list_namespaced_pod,
            self.namespace,
            label_selector=selector,
        )
        items = self.api_client.sanitize_for_serialization(pods).get("items", [])
        return items[0] if items else None

    def log_stream(self, pod: str):
        return self.core.read_namespaced_pod_log(
            pod, self.namespace, container=self.kind.container, follow=True, _preload_content=False
        )


class NotFound(Exception):
    pass


class Conflict(Exception):
    pass


class LogFollower(threading.Thread):
    """Print rank 0's log as it is written; follow again when its container restarts."""

    def __init__(self, api: JobApi, name: str, selector: str):
        super().__init__(daemon=True)
        self.api, self.name, self.selector = api, name, selector
        self.stop = threading.Event()
        self.seen: set[tuple[str, int]] = set()
        self.last_line, self.last_text = time.monotonic(), ""  # for stall.py

    def touch(self) -> None:
        self.last_line = time.monotonic()

    def said(self, text: str) -> None:
        print(text, flush=True)
        self.last_line, self.last_text = time.monotonic(), text[-200:]

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.follow_once()
            except Exception as exc:  # logs are a convenience: never fail the run over them
                print(f"(log stream: {exc.__class__.__name__}: {exc})", file=sys.stderr)
            self.stop.wait(2.0)

    def follow_once(self) -> None:
        pod = self.api.lead_pod(self.name, self.selector)
        if pod is None or pod.get("status", {}).get("phase") not in (
            "Running",
            "Succeeded",
            "Failed",
        ):
            return
        statuses = pod["status"].get("containerStatuses") or [{}]
        attempt = (pod["metadata"]["uid"], int(statuses[0].get("restartCount", 0)))
        if attempt in self.seen:
            return
        self.seen.add(attempt)
        response = self.api.log_stream(pod["metadata"]["name"])
        buffer = b""
        try:
            for chunk in available(response):
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    self.said(line.decode("utf-8", "replace"))
            if buffer:
                self.said(buffer.decode("utf-8", "replace"))
        finally:
            response.release_conn()


def available(response, size: int = 4096):
    """A followed log's bytes as they arrive. `response.stream(n)` waits until it has n bytes
    (or the end), so a line written every few seconds would reach the user kilobytes late;
    read1 returns what one read of the socket has (urllib3 2.x). Without it, a byte at a time."""
    read1 = getattr(response, "read1", None)
    if read1 is None:
        yield from response.stream(1)
        return
    while chunk := read1(size):
        yield chunk
