"""A loopback stand-in for Kubeflow Trainer's trainer status endpoint (the controller's
`POST .../trainjobs/NAME/status`): it records each request and answers with the status codes
a test queues (200 by default)."""

from __future__ import annotations

import json
import threading
from http.server import ThreadingHTTPServer

from .httpjson import JsonHandler

PATH = "/apis/trainer.kubeflow.org/v1alpha1/namespaces/kubeflow/trainjobs/kt-run/status"


class StatusServer:
    def __init__(self):
        self.posts: list[dict] = []  # {"path", "headers", "body"}
        self.answers: list[int] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}{PATH}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def env(self, token_file) -> dict[str, str]:
        """What Trainer's Progress plugin injects into a trainer pod."""
        return {
            "KUBEFLOW_TRAINER_STATUS_URL": self.url,
            "KUBEFLOW_TRAINER_STATUS_TOKEN": str(token_file),
            "KUBEFLOW_TRAINER_STATUS_CA_CERT": str(token_file.parent / "ca.crt"),
        }

    def close(self) -> None:
        self.server.shutdown()

    def _handler(self):
        fake = self

        class Handler(JsonHandler):
            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length))
                fake.posts.append({"path": self.path, "headers": dict(self.headers), "body": body})
                code = fake.answers.pop(0) if fake.answers else 200
                self._send(code, {} if code == 200 else {"message": "injected"})

        return Handler
