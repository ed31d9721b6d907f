"""A loopback HTTP server answering the KFP v2beta1 REST paths `kubetune submit` calls
(kfp.Client): experiments, pipelines (list, upload, upload_version, versions), runs and
recurringruns. It records every request with its parsed body for the tests to check."""

from __future__ import annotations

import json
import re
import uuid
from email.parser import BytesParser
from email.policy import default
from urllib.parse import parse_qs, urlparse

from .httpjson import JsonHandler, Loopback

API = "/apis/v2beta1"
NOW = "2026-11-22T00:00:00Z"


class FakeKfp(Loopback):
    def __init__(self):
        self.requests: list[dict] = []
        self.experiments: dict[str, dict] = {}
        self.pipelines: dict[str, dict] = {}
        self.versions: dict[str, list[dict]] = {}
        self.uploads: list[bytes] = []
        self.runs: list[dict] = []
        self.start()

    def calls(self, method: str, path: str) -> list[dict]:
        return [r for r in self.requests if r["method"] == method and r["path"] == path]

    def _handler(self):
        fake = self

        class Handler(JsonHandler):
            def _record(self, method: str) -> tuple[str, dict, object]:
                url = urlparse(self.path)
                query = {k: v[0] for k, v in parse_qs(url.query).items()}
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                body = None
                kind = self.headers.get("Content-Type", "")
                if raw and kind.startswith("multipart/form-data"):
                    message = BytesParser(policy=default).parsebytes(
                        f"Content-Type: {kind}\r\n\r\n".encode() + raw
                    )
                    body = {
                        p.get_param("name", header="content-disposition"): p.get_payload(
                            decode=True
                        )
                        for p in message.iter_parts()
                    }
                elif raw:
                    body = json.loads(raw)
                fake.requests.append(
                    {"method": method, "path": url.path, "query": query, "body": body}
                )
                return url.path, query, body

            def do_GET(self):
                path, query, _ = self._record("GET")
                if path == f"{API}/healthz":
                    return self._send(200, {"multi_user": False})
                if path == f"{API}/experiments":
                    wanted = _filter_value(query.get("filter", ""))
                    found = [e for e in fake.experiments.values() if e["display_name"] == wanted]
                    return self._send(200, {"experiments": found, "total_size": len(found)})
                if path == f"{API}/pipelines":
                    wanted = _filter_value(query.get("filter", ""))
                    found = [p for p in fake.pipelines.values() if p["display_name"] == wanted]
                    return self._send(200, {"pipelines": found, "total_size": len(found)})
                match = re.fullmatch(rf"{API}/pipelines/([^/]+)/versions", path)
                if match:
                    versions = fake.versions.get(match.group(1), [])
                    return self._send(
                        200, {"pipeline_versions": versions, "total_size": len(versions)}
                    )
                self._send(404, {"error": "not found", "code": 5})

            def do_POST(self):
                path, query, body = self._record("POST")
                if path == f"{API}/experiments":
                    exp = {
                        "experiment_id": str(uuid.uuid4()),
                        "display_name": body["display_name"],
                        "created_at": NOW,
                    }
                    fake.experiments[exp["experiment_id"]] = exp
                    return self._send(200, exp)
                if path in (f"{API}/pipelines/upload", f"{API}/pipelines/upload_version"):
                    fake.uploads.append(body["uploadfile"])
                    if path.endswith("/upload"):
                        pipeline = {
                            "pipeline_id": str(uuid.uuid4()),
                            "display_name": query["name"],
                            "created_at": NOW,
                        }
                        fake.pipelines[pipeline["pipeline_id"]] = pipeline
                        pid, vname = pipeline["pipeline_id"], query["name"]
                    else:
                        pid, vname = query["pipelineid"], query["name"]
                    version = {
                        "pipeline_id": pid,
                        "pipeline_version_id": str(uuid.uuid4()),
                        "display_name": vname,
                        "created_at": NOW,
                    }
                    fake.versions.setdefault(pid, []).insert(0, version)
                    return self._send(200, pipeline if path.endswith("/upload") else version)
                if path == f"{API}/runs":
                    fake.runs.append({**body, "run_id": str(uuid.uuid4()), "state": "PENDING"})
                    return self._send(200, fake.runs[-1])
                if path == f"{API}/recurringruns":
                    return self._send(
                        200, {**body, "recurring_run_id": str(uuid.uuid4()), "status": "ENABLED"}
                    )
                self._send(404, {"error": "not found", "code": 5})

        return Handler


def _filter_value(text: str) -> str | None:
    """The string value of kfp.Client's `display_name EQUALS x` filter (JSON)."""
    if not text:
        return None
    for predicate in json.loads(text).get("predicates", []):
        if predicate.get("key") in ("display_name", "name"):
            return predicate.get("string_value") or predicate.get("stringValue")
    return None
