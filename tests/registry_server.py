"""A loopback Kubeflow Model Registry: the REST paths (api/model_registry/v1) the
`model-registry` client calls to register a model, a version and its artifact, answered from
memory as the registry's REST server answers them (ids as strings, times in ms since the epoch,
404 for a lookup that finds nothing, 409 for a duplicate name). It refuses what a deployed
registry refuses: a request without a bearer token (401: Kubeflow's deployment puts the REST
server behind kube-rbac-proxy / the mesh's authorization; `valid_tokens` narrows which tokens
pass), and a version or artifact under a parent that does not exist (404, not an orphan)."""

from __future__ import annotations

import json
import time
from urllib.parse import parse_qs, urlparse

from .httpjson import JsonHandler, Loopback

BASE = "/api/model_registry/v1"


class RegistryServer(Loopback):
    def __init__(self):
        self.objects: dict[str, dict] = {}  # id → object (with "_kind")
        self.requests: list[tuple[str, str, dict | None]] = []
        self.tokens: set[str | None] = set()  # the Authorization headers seen
        self.down = False  # answer every request with 503
        self.valid_tokens: set[str] | None = None  # None: any bearer token passes
        self.next_id = 1
        self.start()

    def of_kind(self, kind: str) -> list[dict]:
        return [o for o in self.objects.values() if o["_kind"] == kind]

    def _create(self, kind: str, body: dict, parent: str | None = None) -> dict | None:
        parents = {"ModelVersion": "RegisteredModel", "ModelArtifact": "ModelVersion"}
        if kind in parents and (
            parent not in self.objects or self.objects[parent]["_kind"] != parents[kind]
        ):
            raise LookupError(f"no {parents[kind]} with id {parent}")
        for other in self.of_kind(kind):
            if other["name"] == body["name"] and other.get("_parent") == parent:
                return None
        now = str(int(time.time() * 1000))
        obj = {
            **body,
            "id": str(self.next_id),
            "createTimeSinceEpoch": now,
            "lastUpdateTimeSinceEpoch": now,
            "_kind": kind,
            "_parent": parent,
        }
        if kind == "ModelVersion":
            obj["registeredModelId"] = parent
        self.next_id += 1
        self.objects[obj["id"]] = obj
        return obj

    def _handler(self):
        fake = self
        kinds = {
            "registered_model": "RegisteredModel",
            "model_version": "ModelVersion",
            "model_artifact": "ModelArtifact",
            "artifact": "ModelArtifact",
        }

        class Handler(JsonHandler):
            def _out(self, code: int, obj: dict) -> None:
                self._send(code, {k: v for k, v in obj.items() if not k.startswith("_")})

            def _error(self, code: int, message: str) -> None:
                self._send(code, {"code": str(code), "message": message})

            def _route(self, method: str) -> None:
                url = urlparse(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                fake.requests.append((method, self.path, body))
                authorization = self.headers.get("Authorization")
                fake.tokens.add(authorization)
                if fake.down:
                    return self._error(503, "registry unavailable")
                token = (authorization or "").removeprefix("Bearer ").strip()
                if not (authorization or "").startswith("Bearer ") or not token:
                    return self._error(401, "Unauthorized: no bearer token")
                if fake.valid_tokens is not None and token not in fake.valid_tokens:
                    return self._error(401, "Unauthorized: token not accepted")
                if not url.path.startswith(BASE + "/"):
                    return self._error(404, "no such path")
                parts = url.path[len(BASE) + 1 :].split("/")
                try:
                    self._answer(method, url, parts, body)
                except LookupError as exc:
                    self._error(404, str(exc))

            def _answer(self, method: str, url, parts: list[str], body) -> None:
                query = {k: v[0] for k, v in parse_qs(url.query).items()}
                if method == "GET" and len(parts) == 1 and parts[0] in kinds:
                    return self._find(kinds[parts[0]], query)
                collections = {
                    "registered_models": "RegisteredModel",
                    "model_versions": "ModelVersion",
                    "model_artifacts": "ModelArtifact",
                }
                if method == "GET" and len(parts) == 1 and parts[0] in collections:
                    return self._list(fake.of_kind(collections[parts[0]]))
                if method == "GET" and len(parts) == 2:
                    obj = fake.objects.get(parts[1])
                    return self._out(200, obj) if obj else self._error(404, "not found")
                if method == "POST" and parts == ["registered_models"]:
                    return self._made(fake._create("RegisteredModel", body))
                if method == "POST" and parts == ["model_versions"]:
                    return self._made(
                        fake._create("ModelVersion", body, body.get("registeredModelId"))
                    )
                if (
                    method == "POST"
                    and len(parts) == 3
                    and parts[0] == "registered_models"
                    and parts[2] == "versions"
                ):
                    return self._made(fake._create("ModelVersion", body, parts[1]))
                if (
                    method == "POST"
                    and len(parts) == 3
                    and parts[0] == "model_versions"
                    and parts[2] == "artifacts"
                ):
                    return self._made(fake._create("ModelArtifact", body, parts[1]))
                if method == "GET" and len(parts) == 3 and parts[2] in ("versions", "artifacts"):
                    kind = "ModelVersion" if parts[2] == "versions" else "ModelArtifact"
                    return self._list([o for o in fake.of_kind(kind) if o["_parent"] == parts[1]])
                return self._error(404, f"{method} {url.path}: not answered here")

            def _find(self, kind: str, query: dict) -> None:
                for obj in fake.of_kind(kind):
                    if obj["name"] == query.get("name") and (
                        "parentResourceId" not in query
                        or obj["_parent"] == query["parentResourceId"]
                    ):
                        return self._out(200, obj)
                return self._error(404, f"no {kind} {query}")

            def _list(self, items: list[dict]) -> None:
                clean = [{k: v for k, v in o.items() if not k.startswith("_")} for o in items]
                page = {"items": clean, "size": len(clean), "pageSize": 100, "nextPageToken": ""}
                self._send(200, page)

            def _made(self, obj: dict | None) -> None:
                if obj is None:
                    return self._error(409, "already exists")
                self._out(201, obj)

            def do_GET(self):
                self._route("GET")

            def do_POST(self):
                self._route("POST")

            def do_PATCH(self):
                self._route("PATCH")

        return Handler
