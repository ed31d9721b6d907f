"""A loopback stand-in for the Hugging Face Hub's HTTP API (what `HF_ENDPOINT` points at):
the model-info call (`/api/models/REPO[/revision/REV]`) and file resolution
(`/REPO/resolve/COMMIT/FILE`, HEAD and GET), with branches pointing at commits. It records
every request so a test can count downloads."""

from __future__ import annotations

import hashlib
import threading
from http.server import ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

from .httpjson import JsonHandler


def not_found(handler, code: str) -> None:
    """The hub's 404, with the error code huggingface_hub turns into its exception."""
    handler.send_response(404)
    handler.send_header("X-Error-Code", code)
    handler.send_header("Content-Length", "0")
    handler.end_headers()


class FakeHub:
    def __init__(self):
        # repo -> commit -> {path: bytes}; repo -> branch -> commit
        self.commits: dict[str, dict[str, dict[str, bytes]]] = {}
        self.branches: dict[str, dict[str, str]] = {}
        self.requests: list[tuple[str, str]] = []
        hub = self

        class Handler(JsonHandler):
            def do_GET(self):  # noqa: N802
                hub._serve(self, body=True)

            def do_HEAD(self):  # noqa: N802
                hub._serve(self, body=False)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def push(self, repo: str, folder: Path, extra: dict[str, bytes], branch: str = "main") -> str:
        """A new commit of `repo` holding folder's files and `extra`; returns its sha."""
        files = {
            str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()
        }
        files.update(extra)
        digest = hashlib.sha1(
            repr(sorted((k, hashlib.sha1(v).hexdigest()) for k, v in files.items())).encode()
        )
        sha = digest.hexdigest()
        self.commits.setdefault(repo, {})[sha] = files
        self.branches.setdefault(repo, {})[branch] = sha
        return sha

    def downloads(self) -> list[str]:
        """Paths of the file GETs served (not HEADs, not API calls)."""
        return [path for method, path in self.requests if method == "GET" and "/resolve/" in path]

    def _commit(self, repo: str, revision: str) -> str | None:
        if revision in self.commits.get(repo, {}):
            return revision
        return self.branches.get(repo, {}).get(revision)

    def _serve(self, handler, body: bool) -> None:
        path = unquote(urlparse(handler.path).path)
        self.requests.append((handler.command, path))
        if path.startswith("/api/models/"):
            rest = path.removeprefix("/api/models/")
            repo, _, revision = rest.partition("/revision/")
            commit = self._commit(repo, revision or "main")
            if repo not in self.commits:
                return handler._send(404, {"error": "Repository not found"})
            if commit is None:
                return not_found(handler, "RevisionNotFound")
            files = self.commits[repo][commit]
            return handler._send(
                200,
                {
                    "id": repo,
                    "modelId": repo,
                    "sha": commit,
                    "private": False,
                    "siblings": [
                        {"rfilename": k, "size": len(v)} for k, v in sorted(files.items())
                    ],
                },
            )
        repo, sep, tail = path.lstrip("/").partition("/resolve/")
        commit_or_branch, _, name = tail.partition("/")
        commit = self._commit(repo, commit_or_branch) if sep else None
        data = self.commits.get(repo, {}).get(commit or "", {}).get(name)
        if data is None:
            return not_found(handler, "EntryNotFound")
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(data)))
        handler.send_header("ETag", f'"{hashlib.sha1(data).hexdigest()}"')
        handler.send_header("X-Repo-Commit", commit)
        handler.end_headers()
        if body:
            handler.wfile.write(data)
        return None

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
