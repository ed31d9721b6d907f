"""A loopback HTTP server answering the Kubernetes REST paths the launcher uses for a PyTorchJob,
a Trainer v2 TrainJob or a KServe InferenceService, since no API server runs in CI. It refuses
what the real servers refuse, each rule with its source:
- every request is authorized against the launcher's Role as shipped (manifests/base/rbac.yaml),
  as RBAC's RuleAllows does: a verb or resource the Role lacks gets 403 and is recorded;
- created objects are checked against their upstream CRD with its CEL rules (tests/k8s_schemas.py),
  the API models (kubeflow-training, kubeflow-trainer-api, kserve), the admission webhooks
  (the Training Operator's DNS-1035 names and replica rules; Trainer's runtime-patch managers),
  and their pods against the core schema and the API server's own pod rules (request <= limit,
  GPU request = limit, mounts of existing volumes); a TrainJob's pod is the shipped runtime's
  template with the job's trainer and runtimePatches applied;
- a queued job gets a Kueue Workload (label kueue.x-k8s.io/job-uid) only when Kueue's
  integration for its kind is enabled (`kueue`; None: Kueue not installed);
- a watch can end in 410 Gone (`gone_watches`), as one from a compacted resourceVersion does.
The job then moves through the conditions a scenario gives ("pod" starts rank 0's pod without a
condition, as a TrainJob has no Running)."""

from __future__ import annotations

import json
import threading
import time
import uuid
from http.server import ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import yaml

from .httpjson import JsonHandler
from .k8s_schemas import (
    crd_errors,
    pod_template_errors,
    pytorchjob_api_errors,
    pytorchjob_webhook_errors,
    trainer_api_errors,
    trainer_webhook_errors,
    trainjob_pod,
)

REPO = Path(__file__).resolve().parent.parent
KINDS = {
    "pytorchjob": {
        "kind": "PyTorchJob",
        "jobs": "/apis/kubeflow.org/v1/namespaces/{ns}/pytorchjobs",
        "plural": "pytorchjobs",
        "container": "pytorch",
    },
    "inferenceservice": {
        "kind": "InferenceService",
        "jobs": "/apis/serving.kserve.io/v1beta1/namespaces/{ns}/inferenceservices",
        "plural": "inferenceservices",
        "container": "kserve-container",
    },
    "trainjob": {
        "kind": "TrainJob",
        "jobs": "/apis/trainer.kubeflow.org/v1alpha1/namespaces/{ns}/trainjobs",
        "plural": "trainjobs",
        "container": "node",
    },
}


KUEUE_FRAMEWORKS = {  # Kueue's integration names (its Configuration's integrations.frameworks)
    "PyTorchJob": "kubeflow.org/pytorchjob",
    "TrainJob": "trainer.kubeflow.org/trainjob",
}
WORKLOADS = "/apis/kueue.x-k8s.io/v1beta2/namespaces/{ns}/workloads"
QUEUE_LABEL, JOB_UID_LABEL = "kueue.x-k8s.io/queue-name", "kueue.x-k8s.io/job-uid"
PICKUP_DELAY = 0.3  # seconds before Kueue's job reconciler makes a queued job's Workload


def role_rules() -> list[dict]:
    """The launcher's Role as shipped (manifests/base/rbac.yaml)."""
    docs = yaml.safe_load_all((REPO / "manifests" / "base" / "rbac.yaml").read_text())
    (role,) = [d for d in docs if d and d["kind"] == "Role"]
    return role["rules"]


def request_attributes(method: str, path: str) -> tuple[str, str, str] | None:
    """(API group, resource[/subresource], verb) of a request, as the API server's
    RequestInfoFactory derives them (k8s.io/apiserver pkg/endpoints/request/requestinfo.go);
    None for a path that names no resource."""
    url = urlparse(path)
    parts = [p for p in url.path.split("/") if p]
    if parts[:1] == ["api"]:
        group, rest = "", parts[2:]
    elif parts[:1] == ["apis"]:
        group, rest = parts[1], parts[3:]
    else:
        return None
    if rest[:1] == ["namespaces"] and len(rest) >= 3:
        rest = rest[2:]
    if not rest:
        return None
    resource, name, sub = rest[0], rest[1] if len(rest) > 1 else "", rest[2:3]
    query = {k: v[0] for k, v in parse_qs(url.query).items()}
    if method == "GET":
        if name:
            verb = "get"
        else:
            verb = "watch" if query.get("watch", "").lower() in ("true", "1") else "list"
    else:
        verb = {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}[method]
        if method == "DELETE" and not name:
            verb = "deletecollection"
    return group, resource + (f"/{sub[0]}" if sub else ""), verb


def allowed(rules: list[dict], group: str, resource: str, verb: str) -> bool:
    """RBAC's RuleAllows (k8s.io/kubernetes plugin/pkg/auth/authorizer/rbac/rbac.go): some rule
    names the group, the resource (with its subresource) and the verb, or '*'."""
    return any(
        (group in r.get("apiGroups", []) or "*" in r.get("apiGroups", []))
        and (resource in r.get("resources", []) or "*" in r.get("resources", []))
        and (verb in r.get("verbs", []) or "*" in r.get("verbs", []))
        for r in rules
    )


def selected(objects, query: dict) -> list[dict]:
    """The objects a list request's equality labelSelector (k=v,k=v) picks."""
    wanted = dict(kv.split("=", 1) for kv in query.get("labelSelector", "").split(",") if kv)
    return [
        o for o in objects if all(o["metadata"]["labels"].get(k) == v for k, v in wanted.items())
    ]


def shipped_runtime() -> dict:
    return yaml.safe_load(
        (REPO / "manifests" / "trainer-v2" / "clustertrainingruntime.yaml").read_text()
    )


class FakeKube:
    def __init__(self, namespace: str = "kubeflow", kind: str = "pytorchjob"):
        self.ns = namespace
        self.kind = KINDS[kind]
        self.jobs: dict[str, dict] = {}
        self.logs: dict[str, list[str]] = {}
        self.pods: dict[str, dict] = {}
        self.requests: list[tuple[str, str, dict | None]] = []
        self.invalid: list[str] = []
        self.failures: dict[str, list[int]] = {}  # "POST"/"GET"/...: statuses to answer first
        self.scenario: list[tuple[float, str, str, str]] | None = None
        self.rv = 0
        # Kueue: the integrations its Configuration enables (None: Kueue not installed)
        self.kueue: set[str] | None = set(KUEUE_FRAMEWORKS.values())
        self.workloads: dict[str, dict] = {}
        self.rules = role_rules()  # what the launcher's service account may do
        self.forbidden: list[tuple[str, str, str]] = []  # requests the Role does not allow
        self.gone_watches = 0  # watches to end with 410 Gone (a compacted resourceVersion)
        self.cond = threading.Condition()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def kubeconfig(self, folder: Path) -> Path:
        path = folder / "kubeconfig"
        path.write_text(
            json.dumps(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
                    "users": [{"name": "u", "user": {"token": "not-a-secret"}}],
                    "contexts": [{"name": "c", "context": {"cluster": "fake", "user": "u"}}],
                    "current-context": "c",
                }
            )
        )
        return path

    def close(self) -> None:
        self.server.shutdown()
        with self.cond:
            self.cond.notify_all()

    # --- what the test drives ---

    def count(self, method: str, suffix: str = "") -> int:
        return sum(1 for m, p, _ in self.requests if m == method and p.endswith(suffix))

    def lead_pod_name(self, name: str) -> str:
        return f"{name}-master-0" if self.kind["kind"] == "PyTorchJob" else f"{name}-node-0-0-x7k2p"

    def start_pod(self, name: str) -> None:
        with self.cond:
            self._add_pod(name)
            self._bump(self.jobs[name])

    def suspend(self, name: str, value: bool) -> None:
        """What Kueue does: admit a job (suspend false) or evict it (suspend true); the
        controller then records it in the Suspended condition (and deletes the pods)."""
        with self.cond:
            job = self.jobs[name]
            spec = job["spec"]
            target = spec.setdefault("runPolicy", {}) if self.kind["kind"] == "PyTorchJob" else spec
            target["suspend"] = value
            conditions = job.setdefault("status", {}).setdefault("conditions", [])
            conditions[:] = [c for c in conditions if c["type"] != "Suspended"]
            for c in conditions:
                if value and c["type"] in ("Running", "Restarting"):
                    c["status"] = "False"
            conditions.append(
                {
                    "type": "Suspended",
                    "status": "True" if value else "False",
                    "reason": "Suspended" if value else "Resumed",
                    "message": f"{self.kind['kind']} {name} is {'suspended' if value else 'resumed'}.",
                    "lastTransitionTime": "2026-11-22T00:00:00Z",
                    "lastUpdateTime": "2026-11-22T00:00:00Z",
                }
            )
            if value:  # the controller deletes the pods; a new pod writes a new log
                self.pods.pop(self.lead_pod_name(name), None)
                self.logs.pop(self.lead_pod_name(name), None)
            self._bump(job)

    def set_condition(self, name: str, kind: str, reason: str = "", message: str = "") -> None:
        if kind == "pod":
            return self.start_pod(name)
        if kind in ("admit", "preempt"):
            return self.suspend(name, kind == "preempt")
        job_kind = self.kind["kind"]
        with self.cond:
            job = self.jobs[name]
            conditions = job.setdefault("status", {}).setdefault("conditions", [])
            for c in conditions:
                if kind in ("Running", "Succeeded", "Failed", "Restarting") and c["type"] in (
                    "Running",
                    "Restarting",
                ):
                    c["status"] = "False"
            conditions.append(
                {
                    "type": kind,
                    "status": "True",
                    "reason": reason or f"{job_kind}{kind}",
                    "message": message or f"{job_kind} {name} is {kind.lower()}.",
                    "lastTransitionTime": "2026-11-22T00:00:00Z",
                    "lastUpdateTime": "2026-11-22T00:00:00Z",
                }
            )
            if kind == "Running":
                self._add_pod(name)
            if kind in ("Succeeded", "Complete", "Failed"):
                for pod in self.pods.values():
                    if pod["metadata"]["name"] == self.lead_pod_name(name):
                        pod["status"]["phase"] = "Failed" if kind == "Failed" else "Succeeded"
            self._bump(job)

    def log(self, name: str, line: str) -> None:
        with self.cond:
            self.logs.setdefault(self.lead_pod_name(name), []).append(line)
            self.cond.notify_all()

    def run_scenario(self, name: str) -> None:
        for delay, kind, reason, message in self.scenario or []:
            time.sleep(delay)
            if name not in self.jobs:
                return
            if kind == "log":
                self.log(name, reason)
            else:
                self.set_condition(name, kind, reason, message)

    def make_workload(self, job: dict) -> None:
        """What Kueue's job reconciler does for a job with a queue label whose integration is
        enabled: a Workload labelled with the job's uid, owned by the job."""
        kind = self.kind["kind"]
        if self.kueue is None or KUEUE_FRAMEWORKS.get(kind) not in self.kueue:
            return
        meta = job["metadata"]
        with self.cond:
            if meta["name"] not in self.jobs:
                return
            name = f"{kind.lower()}-{meta['name']}-{meta['uid'][:5]}"
            self.workloads[name] = {
                "apiVersion": "kueue.x-k8s.io/v1beta2",
                "kind": "Workload",
                "metadata": {
                    "name": name,
                    "namespace": self.ns,
                    "labels": {
                        JOB_UID_LABEL: meta["uid"],
                        QUEUE_LABEL: meta["labels"][QUEUE_LABEL],
                    },
                    "ownerReferences": [
                        {
                            "apiVersion": job["apiVersion"],
                            "kind": kind,
                            "name": meta["name"],
                            "uid": meta["uid"],
                            "controller": True,
                        }
                    ],
                },
                "spec": {"queueName": meta["labels"][QUEUE_LABEL], "active": True},
            }

    # --- internals ---

    def _bump(self, job: dict) -> None:
        self.rv += 1
        job["metadata"]["resourceVersion"] = str(self.rv)
        self.cond.notify_all()

    def _add_pod(self, name: str) -> None:
        pod_name = self.lead_pod_name(name)
        if self.kind["kind"] == "PyTorchJob":
            labels = {
                "training.kubeflow.org/job-name": name,
                "training.kubeflow.org/replica-type": "master",
                "training.kubeflow.org/replica-index": "0",
            }
        else:  # JobSet's labels and the Indexed Job's completion index
            labels = {
                "jobset.sigs.k8s.io/jobset-name": name,
                "jobset.sigs.k8s.io/replicatedjob-name": "node",
                "jobset.sigs.k8s.io/job-index": "0",
                "batch.kubernetes.io/job-completion-index": "0",
            }
        container = self.kind["container"]
        self.pods[pod_name] = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": pod_name,
                "namespace": self.ns,
                "uid": str(uuid.uuid4()),
                "labels": labels,
            },
            "spec": {"containers": [{"name": container, "image": "x"}]},
            "status": {
                "phase": "Running",
                "containerStatuses": [
                    {
                        "name": container,
                        "image": "x",
                        "imageID": "x",
                        "ready": True,
                        "restartCount": 0,
                    }
                ],
            },
        }

    def _handler(self):
        fake = self

        class Handler(JsonHandler):
            protocol_version = "HTTP/1.0"  # bodies end when the connection closes: watch streams

            def _status(self, code: int, reason: str, message: str) -> None:
                self._send(
                    code,
                    {
                        "kind": "Status",
                        "apiVersion": "v1",
                        "status": "Failure",
                        "message": message,
                        "reason": reason,
                        "code": code,
                    },
                )

            def _body(self) -> dict | None:
                length = int(self.headers.get("Content-Length") or 0)
                return json.loads(self.rfile.read(length)) if length else None

            def _forbidden(self, method: str) -> bool:
                """The Role's verdict, as the RBAC authorizer gives it before anything else."""
                attributes = request_attributes(method, self.path)
                if attributes is None or allowed(fake.rules, *attributes):
                    return False
                group, resource, verb = attributes
                fake.forbidden.append(attributes)
                self._status(
                    403,
                    "Forbidden",
                    f'{resource} is forbidden: User "system:serviceaccount:{fake.ns}:kubetune" '
                    f'cannot {verb} resource "{resource}" in API group "{group}" in the '
                    f'namespace "{fake.ns}"',
                )
                return True

            def _injected(self, method: str) -> bool:
                queue = fake.failures.get(method)
                if queue:
                    code = queue.pop(0)
                    self._status(code, "Injected", f"injected HTTP {code}")
                    return True
                return False

            def do_POST(self):
                body = self._body()
                fake.requests.append(("POST", self.path, body))
                if self._forbidden("POST") or self._injected("POST"):
                    return
                jobs = fake.kind["jobs"].format(ns=fake.ns)
                if urlparse(self.path).path != jobs:
                    return self._status(404, "NotFound", "no such path")
                if fake.kind["kind"] == "InferenceService":
                    from .kserve_api import kserve_errors

                    errors = kserve_errors(body)
                    errors = errors or crd_errors(body)
                elif fake.kind["kind"] == "TrainJob":  # CRD (CEL too), models, then the webhook
                    errors = (
                        crd_errors(body) or trainer_api_errors(body) or trainer_webhook_errors(body)
                    )
                else:  # the CRD, the API models, then the Training Operator's webhook
                    errors = (
                        crd_errors(body, fake.kind["kind"])
                        + pytorchjob_api_errors(body)
                        + pytorchjob_webhook_errors(body)
                    )
                if fake.kind["kind"] == "TrainJob" and not errors:
                    errors += pod_template_errors(trainjob_pod(shipped_runtime(), body))
                for replica in body.get("spec", {}).get("pytorchReplicaSpecs", {}).values():
                    errors += pod_template_errors(replica.get("template", {}))
                if errors:
                    fake.invalid += errors
                    return self._status(422, "Invalid", "; ".join(errors))
                name = body["metadata"]["name"]
                with fake.cond:
                    if name in fake.jobs:
                        return self._status(409, "AlreadyExists", f'"{name}" already exists')
                    body["metadata"]["uid"] = str(uuid.uuid4())
                    body["metadata"]["creationTimestamp"] = "2026-11-22T00:00:00Z"
                    fake.jobs[name] = body
                    fake._bump(body)
                    spec = body["spec"]
                    if (spec.get("runPolicy") or spec).get("suspend"):
                        fake.suspend(name, True)  # queued: the controller's condition
                if QUEUE_LABEL in (body["metadata"].get("labels") or {}):
                    threading.Timer(PICKUP_DELAY, fake.make_workload, (body,)).start()
                threading.Thread(target=fake.run_scenario, args=(name,), daemon=True).start()
                self._send(201, body)

            def do_PUT(self):  # replace: a new spec, the status kept
                body = self._body()
                fake.requests.append(("PUT", self.path, body))
                if self._forbidden("PUT"):
                    return
                from .kserve_api import kserve_errors

                errors = kserve_errors(body) if fake.kind["kind"] == "InferenceService" else []
                if errors:
                    fake.invalid += errors
                    return self._status(422, "Invalid", "; ".join(errors))
                name = urlparse(self.path).path.rsplit("/", 1)[-1]
                with fake.cond:
                    current = fake.jobs.get(name)
                    if current is None:
                        return self._status(404, "NotFound", f'"{name}" not found')
                    if (
                        body["metadata"].get("resourceVersion")
                        != current["metadata"]["resourceVersion"]
                    ):
                        return self._status(409, "Conflict", "the object has been modified")
                    current["spec"] = body["spec"]
                    current["metadata"]["labels"] = body["metadata"].get("labels", {})
                    fake._bump(current)
                self._send(200, current)

            def do_DELETE(self):
                fake.requests.append(("DELETE", self.path, self._body()))
                if self._forbidden("DELETE") or self._injected("DELETE"):
                    return
                name = urlparse(self.path).path.rsplit("/", 1)[-1]
                with fake.cond:
                    job = fake.jobs.pop(name, None)
                    if job is None:
                        return self._status(404, "NotFound", f'"{name}" not found')
                    job["deleted"] = True
                    fake.cond.notify_all()
                self._send(200, {"kind": "Status", "status": "Success"})

            def do_GET(self):
                url = urlparse(self.path)
                query = {k: v[0] for k, v in parse_qs(url.query).items()}
                fake.requests.append(("GET", self.path, None))
                if self._forbidden("GET") or self._injected("GET"):
                    return
                jobs = fake.kind["jobs"].format(ns=fake.ns)
                if url.path == WORKLOADS.format(ns=fake.ns):
                    if fake.kueue is None:  # no Kueue: the API has no such resource
                        return self._status(404, "NotFound", "the server could not find it")
                    with fake.cond:
                        items = selected(fake.workloads.values(), query)
                    return self._send(
                        200,
                        {
                            "apiVersion": "kueue.x-k8s.io/v1beta2",
                            "kind": "WorkloadList",
                            "metadata": {},
                            "items": items,
                        },
                    )
                if url.path == jobs and query.get("watch", "").lower() == "true":
                    return self._watch(query)
                if url.path.startswith(jobs + "/"):
                    name = url.path[len(jobs) + 1 :].split("/")[0]
                    job = fake.jobs.get(name)
                    if job is None:
                        plural = fake.kind["plural"]
                        return self._status(404, "NotFound", f'{plural} "{name}" not found')
                    return self._send(200, job)
                pods = f"/api/v1/namespaces/{fake.ns}/pods"
                if url.path == pods:
                    items = selected(fake.pods.values(), query)
                    return self._send(
                        200, {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": items}
                    )
                if url.path.startswith(pods + "/") and url.path.endswith("/log"):
                    return self._logs(url.path[len(pods) + 1 : -len("/log")], query)
                self._status(404, "NotFound", "no such path")

            def _watch(self, query: dict) -> None:
                name = query.get("fieldSelector", "").removeprefix("metadata.name=")
                sent = int(query.get("resourceVersion") or 0)
                deadline = time.monotonic() + float(query.get("timeoutSeconds") or 30)
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                with fake.cond:
                    if fake.gone_watches > 0:  # the resourceVersion was compacted away
                        fake.gone_watches -= 1
                        status = {
                            "kind": "Status",
                            "apiVersion": "v1",
                            "status": "Failure",
                            "message": f"too old resource version: {sent} ({fake.rv})",
                            "reason": "Expired",
                            "code": 410,
                        }
                        event = {"type": "ERROR", "object": status}
                        self.wfile.write((json.dumps(event) + "\n").encode())
                        return
                    while time.monotonic() < deadline:
                        job = fake.jobs.get(name)
                        if job is None:
                            event = {"type": "DELETED", "object": {"metadata": {"name": name}}}
                            self.wfile.write((json.dumps(event) + "\n").encode())
                            return
                        rv = int(job["metadata"]["resourceVersion"])
                        if rv > sent:
                            event = {"type": "MODIFIED", "object": job}
                            self.wfile.write((json.dumps(event) + "\n").encode())
                            self.wfile.flush()
                            sent = rv
                        fake.cond.wait(timeout=0.2)

            def _logs(self, pod: str, query: dict) -> None:
                if pod not in fake.pods:
                    return self._status(404, "NotFound", f'pods "{pod}" not found')
                if query.get("container") != fake.kind["container"]:
                    container = query.get("container")
                    return self._status(400, "BadRequest", f"no container {container} in {pod}")
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.end_headers()
                sent = 0
                with fake.cond:
                    while True:
                        lines = fake.logs.get(pod, [])
                        for line in lines[sent:]:
                            self.wfile.write((line + "\n").encode())
                        self.wfile.flush()
                        sent = len(lines)
                        if (
                            pod not in fake.pods  # deleted (a preemption)
                            or fake.pods[pod]["status"]["phase"] != "Running"
                            or query.get("follow", "").lower() != "true"
                        ):
                            return
                        fake.cond.wait(timeout=0.2)

        return Handler
