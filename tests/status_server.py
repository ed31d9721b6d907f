"""A loopback stand-in for Kubeflow Trainer's trainer status endpoint (the controller's
`POST .../trainjobs/NAME/status`): it records each request and answers with the status codes
a test queues (200 by default)."""

from __future__ import annotations

import json

from .httpjson import JsonHandler, Loopback

PATH = "/apis/trainer.kubeflow.org/v1alpha1/namespaces/kubeflow/trainjobs/kt-run/status"


class StatusServer(Loopback):
    def __init__(self):
        self.posts: list[dict] = []  # {"path", "headers", "body"}
        self.answers: list[int] = []
        self.start()
        self.url += PATH

    def env(self, token_file) -> dict[str, str]:
        """What Trainer's Progress plugin injects into a trainer pod."""
        return {
            "KUBEFLOW_TRAINER_STATUS_URL": self.url,
            "KUBEFLOW_TRAINER_STATUS_TOKEN": str(token_file),
            "KUBEFLOW_TRAINER_STATUS_CA_CERT": str(token_file.parent / "ca.crt"),
        }

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
