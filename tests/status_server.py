"""A loopback stand-in for Kubeflow Trainer's trainer status server (the controller's
`POST /apis/trainer.kubeflow.org/v1alpha1/namespaces/NS/trainjobs/NAME/status`), as strict as
the real one: HTTPS with a certificate from a CA generated here (the trainer pods trust the
controller's CA through KUBEFLOW_TRAINER_SERVER_CA_CERT), the job's own path only, a bearer
token that must be the pod's projected ServiceAccount token, and a JSON body (kubeflow/trainer
v2.3.0, pkg/statusserver). It records each request it accepts and answers with the status codes
a test queues (200 by default)."""

from __future__ import annotations

import datetime
import ipaddress
import json
import ssl
from pathlib import Path

from .httpjson import JsonHandler, Loopback

PATH = "/apis/trainer.kubeflow.org/v1alpha1/namespaces/kubeflow/trainjobs/kt-run/status"


def make_ca_and_server_cert(folder: Path) -> tuple[Path, Path, Path]:
    """A CA, and a certificate it signs for 127.0.0.1: (ca.crt, server.crt, server.key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kubetune test trainer CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    server = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    paths = folder / "ca.crt", folder / "server.crt", folder / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(server.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


class StatusServer(Loopback):
    def __init__(self, folder: Path, token: str = "projected-sa-token"):
        """`folder` receives the CA (ca.crt) and the pod's token file (token)."""
        self.posts: list[dict] = []  # {"path", "headers", "body"}, accepted requests only
        self.refused: list[tuple[int, str]] = []  # (status, why)
        self.answers: list[int] = []
        self.token = token
        self.ca, cert, key = make_ca_and_server_cert(folder)
        self.token_file = folder / "token"
        self.token_file.write_text(token + "\n")
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls.load_cert_chain(cert, key)
        self.start(tls)
        self.url += PATH

    def env(self) -> dict[str, str]:
        """What Trainer's TrainJobStatus plugin injects into a trainer pod (kubeflow/trainer
        v2.3.0, pkg/runtime/framework/plugins/trainjobstatus/trainjobstatus.go)."""
        return {
            "KUBEFLOW_TRAINER_SERVER_URL": self.url,
            "KUBEFLOW_TRAINER_SERVER_CA_CERT": str(self.ca),
            "KUBEFLOW_TRAINER_SERVER_TOKEN": str(self.token_file),
        }

    def _handler(self):
        fake = self

        class Handler(JsonHandler):
            def refuse(self, code: int, why: str) -> None:
                fake.refused.append((code, why))
                self._send(code, {"message": why})

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                if self.path != PATH:
                    return self.refuse(404, f"no such path {self.path}")
                if self.headers.get("Authorization") != f"Bearer {fake.token}":
                    return self.refuse(401, "not the pod's ServiceAccount token")
                if self.headers.get("Content-Type") != "application/json":
                    return self.refuse(415, "a JSON body is expected")
                try:
                    body = json.loads(raw)
                except ValueError:
                    return self.refuse(400, "not JSON")
                fake.posts.append({"path": self.path, "headers": dict(self.headers), "body": body})
                code = fake.answers.pop(0) if fake.answers else 200
                self._send(code, {} if code == 200 else {"message": "injected"})

            def do_GET(self):
                self.refuse(405, "only POST")

            do_PUT = do_PATCH = do_DELETE = do_GET

        return Handler
