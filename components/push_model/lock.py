"""One push at a time per S3 prefix: a lease object claimed with a conditional write.

A push claims `PREFIX/.kubetune-push.lock` with `If-None-Match: *` before it touches anything
under the prefix, renews it with `If-Match: <its ETag>` while it uploads, checks it still holds
it just before writing manifest.json (itself written with `If-None-Match: *`), and deletes it
with `If-Match` at the end. So when two runs push different models to one prefix at once, one
wins and the other stops before changing anything, saying who holds the prefix.

- The lease names the model by its content (the SHA-256 of every file's path, size and
  SHA-256): a rerun of the *same* model (a retried KFP task, a push that stopped on expired
  credentials) takes the lease over at once, since both would write the very same bytes.
- A lease not renewed for `lease_s` (a push that was killed) may be taken over, again with
  `If-Match`, so of two runs taking over the same dead lease only one succeeds.
- A server that ignores conditional writes (some older S3-compatible stores) is detected
  once per push (a second `If-None-Match: *` write of the lease succeeds where it must fail):
  the push warns that two pushes at once are not excluded there, and falls back to reading
  the lease back before the manifest, which narrows the window but cannot close it.
"""

from __future__ import annotations

import hashlib
import json
import socket
import sys
import threading
import time
import uuid
from contextlib import suppress
from typing import TYPE_CHECKING

from ..errors import UserError
from ..storage import is_not_found

if TYPE_CHECKING:
    from .files import LocalFile
    from .upload import S3Destination

LOCK = ".kubetune-push.lock"
LEASE_S = 300  # a push that has not renewed its lease for 5 minutes is taken for dead
RENEW_S = 30


def content_key(files: list[LocalFile]) -> str:
    """The model's identity: the SHA-256 of every file's path, size and SHA-256."""
    digest = hashlib.sha256()
    for f in files:
        digest.update(f"{f.path}\0{f.size}\0{f.sha256}\n".encode())
    return digest.hexdigest()


def precondition_failed(exc) -> bool:
    return exc.response.get("Error", {}).get("Code") in ("PreconditionFailed", "412")


class PushLock:
    def __init__(self, target: S3Destination, content: str, lease_s: float = LEASE_S):
        self.target = target
        self.key = target.key(LOCK)
        self.content = content
        self.lease_s = lease_s
        self.owner = uuid.uuid4().hex
        self.started = time.time()
        self.etag: str | None = None
        self.lost: str | None = None
        self.guard = threading.Lock()
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None

    # -- the lease object ----------------------------------------------------------------
    def _body(self) -> bytes:
        return json.dumps(
            {
                "owner": self.owner,
                "content": self.content,
                "host": socket.gethostname(),
                "started": self.started,
                "renewed": time.time(),
                "lease_s": self.lease_s,
            }
        ).encode()

    def _put(self, **condition) -> str:
        response = self.target.client.put_object(
            Bucket=self.target.bucket,
            Key=self.key,
            Body=self._body(),
            ContentType="application/json",
            **self.target.encryption.args(),
            **condition,
        )
        return response["ETag"]

    def _read(self) -> tuple[dict | None, str | None]:
        from botocore.exceptions import ClientError

        try:
            got = self.target.client.get_object(Bucket=self.target.bucket, Key=self.key)
        except ClientError as exc:
            if is_not_found(exc):
                return None, None
            raise
        try:
            return json.loads(got["Body"].read()), got["ETag"]
        except ValueError:
            return {}, got["ETag"]  # not ours to read: treated as a dead lease

    # -- claim, renew, check, release ----------------------------------------------------
    def acquire(self) -> None:
        from botocore.exceptions import ClientError

        for _ in range(3):
            try:
                self.etag = self._put(IfNoneMatch="*")
                break
            except ClientError as exc:
                if not precondition_failed(exc):
                    raise
            held, etag = self._read()
            if held is None:
                continue  # released in between: claim it again
            if held.get("content") != self.content and not self._expired(held):
                raise UserError(self._busy(held))
            try:
                self.etag = self._put(IfMatch=etag)
                break
            except ClientError as exc:
                if not precondition_failed(exc):
                    raise  # someone else took it over first: look again
        else:
            held, _ = self._read()
            raise UserError(self._busy(held or {}))
        if not self._honours_conditions():
            print(
                f"warning: {self.target.uri}: this S3 endpoint ignores conditional writes "
                "(If-None-Match); two pushes to this prefix at once cannot be excluded here",
                file=sys.stderr,
            )
        self.thread = threading.Thread(target=self._heartbeat, daemon=True)
        self.thread.start()

    def _honours_conditions(self) -> bool:
        """Whether the server refuses a second If-None-Match write of an existing object."""
        from botocore.exceptions import ClientError

        try:
            etag = self._put(IfNoneMatch="*")
        except ClientError as exc:
            if precondition_failed(exc):
                return True
            raise
        self.etag = etag
        return False

    def _expired(self, held: dict) -> bool:
        try:
            return time.time() > float(held["renewed"]) + float(held["lease_s"])
        except (KeyError, TypeError, ValueError):
            return True

    def _busy(self, held: dict) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(held.get("started", 0)))
        return (
            f"{self.target.uri}: another push is writing a different model here (from "
            f"{held.get('host', '?')}, since {since}); this push stopped before changing "
            "anything. Push again when that one has finished (or, if it died, after its "
            f"{int(held.get('lease_s', self.lease_s))} s lease runs out), or to another prefix"
        )

    def _heartbeat(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        while not self.stop.wait(min(RENEW_S, self.lease_s / 5)):
            with self.guard:
                try:
                    self.etag = self._put(IfMatch=self.etag)
                except ClientError as exc:
                    if precondition_failed(exc):
                        self.lost = "another push took the prefix over"
                        return
                except BotoCoreError:
                    pass  # a missed renewal; the lease outlives several of them

    def check_held(self) -> None:
        """Raise unless this push still holds the prefix (just before the manifest)."""
        with self.guard:
            held, etag = self._read()
        if self.lost is None and (held or {}).get("owner") != self.owner:
            self.lost = "another push took the prefix over"
        if self.lost is not None:
            raise UserError(
                f"{self.target.uri}: {self.lost} while this push was uploading; this push "
                "wrote no manifest (the other push's manifest decides what the prefix holds)"
            )
        self.etag = etag

    def release(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        self.stop.set()
        if self.thread is not None:
            self.thread.join()
        if self.lost is not None or self.etag is None:
            return
        # a lease left behind (no credentials any more): the same model's rerun takes it over
        with suppress(BotoCoreError, ClientError):
            self.target.client.delete_object(
                Bucket=self.target.bucket, Key=self.key, IfMatch=self.etag
            )
