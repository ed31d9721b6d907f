"""An HTTP proxy in front of the S3 test server that answers chosen requests with the errors
real S3 throws: 503 SlowDown (throttling), 500 InternalError, 400 ExpiredToken; with `landed`,
after forwarding the request, so the write took effect and only its response was lost (what a
connection cut on the way back, or S3's own 500 after a commit, looks like to the client).
Everything else is forwarded unchanged; every request is logged with the status it got."""

from __future__ import annotations

import http.client
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade"}
STATUS = {"SlowDown": 503, "InternalError": 500, "ExpiredToken": 400}


@dataclass
class Fault:
    """Answer `code` to the requests `match(method, path, query)` accepts: the first `times`
    of them (every one when None), after letting `after` of them through."""

    code: str
    match: object
    times: int | None = 1
    after: int = 0
    landed: bool = False  # forward it first: the write happens, the client sees the error
    seen: int = 0
    injected: int = 0

    def fires(self, method: str, path: str, query: str) -> bool:
        if not self.match(method, path, query):
            return False
        self.seen += 1
        if self.seen <= self.after or (self.times is not None and self.injected >= self.times):
            return False
        self.injected += 1
        return True


@dataclass
class FaultyS3:
    upstream: str
    faults: list[Fault] = field(default_factory=list)
    log: list[tuple[str, str, str, int]] = field(
        default_factory=list
    )  # method, path, query, status
    upload_delay: float = 0.0  # seconds each object upload is held (to make pushes overlap)
    conditional: bool = True  # False: drop If-Match/If-None-Match, like a server without them

    def __post_init__(self):
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _handle(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                url = urlsplit(self.path)
                with proxy.lock:
                    fault = next(
                        (f for f in proxy.faults if f.fires(self.command, url.path, url.query)),
                        None,
                    )
                if fault is not None and fault.landed:
                    forward(self.command, self.path, body, dict(self.headers.items()))
                if fault is not None:
                    status = STATUS[fault.code]
                    data = (
                        f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{fault.code}</Code>"
                        f"<Message>injected {fault.code}</Message></Error>"
                    ).encode()
                    headers = [("Content-Type", "application/xml")]
                else:
                    if proxy.upload_delay and uploads(self.command, url.path, url.query):
                        time.sleep(proxy.upload_delay)
                    status, data, headers = forward(
                        self.command, self.path, body, dict(self.headers.items())
                    )
                with proxy.lock:
                    proxy.log.append((self.command, url.path, url.query, status))
                self.send_response(status)
                for k, v in headers:
                    self.send_header(k, v)
                if self.command != "HEAD" or fault is not None:
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        def forward(method: str, path: str, body: bytes, headers: dict):
            target = urlsplit(proxy.upstream)
            conn = http.client.HTTPConnection(target.hostname, target.port, timeout=60)
            sent = {k: v for k, v in headers.items() if k.lower() not in HOP_BY_HOP}
            if not proxy.conditional:
                sent = {
                    k: v for k, v in sent.items() if k.lower() not in ("if-match", "if-none-match")
                }
            conn.request(method, path, body=body, headers=sent)
            answer = conn.getresponse()
            status, data = answer.status, answer.read()
            dropped = HOP_BY_HOP | ({"content-length"} if method != "HEAD" else set())
            kept = [(k, v) for k, v in answer.getheaders() if k.lower() not in dropped]
            conn.close()
            return status, data, kept

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def add(self, fault: Fault) -> Fault:
        with self.lock:
            self.faults.append(fault)
        return fault

    def clear(self) -> None:
        with self.lock:
            self.faults.clear()
            self.log.clear()

    def requests(self, method: str, status: int | None = None) -> list[tuple[str, str, int]]:
        with self.lock:
            return [
                (p, q, s)
                for m, p, q, s in self.log
                if m == method and (status is None or s == status)
            ]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def uploads(method: str, path: str, query: str) -> bool:
    """An object upload: a PUT of a single object or of a multipart part (not the lease)."""
    return method == "PUT" and ".kubetune-push.lock" not in path and "manifest.json" not in path


def parts(method: str, path: str, query: str) -> bool:
    return method == "PUT" and "partNumber=" in query
