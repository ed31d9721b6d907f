"""Where a push goes: a local folder, or S3 (single PUTs and parallel multipart uploads that
resume from the parts already stored), each upload verified against the store's own digests."""

from __future__ import annotations

import base64
import hashlib
import os
import re
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..outputs import check_parent, check_writable, disk_errors, write_file
from ..storage import is_not_found, is_s3, s3_client, s3_key, split_s3
from .files import READ_BLOCK, LocalFile, md5, part_size_for, sha256_of
from .manifest import MANIFEST


class Progress:
    """Bytes done, as a bar on a terminal and silent elsewhere (thread-safe)."""

    def __init__(self, total: int, label: str):
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="B", unit_scale=True, desc=label)
        self.lock = threading.Lock()

    def add(self, n: int) -> None:
        if self.bar is not None:
            with self.lock:
                self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class LocalDestination:
    def __init__(self, root: Path):
        self.root = root
        self.uri = str(root)

    def check(self) -> None:
        if self.root.exists() and not self.root.is_dir():
            raise UserError(f"{self.root}: exists and is not a folder")
        check_parent(self.root)
        with disk_errors(self.root):
            self.root.mkdir(exist_ok=True)
        check_writable(self.root / MANIFEST)

    def lease(self, files: list[LocalFile]) -> LocalLease:
        return LocalLease()

    def remove_manifest(self) -> None:
        (self.root / MANIFEST).unlink(missing_ok=True)

    def present(self, entry: LocalFile) -> bool:
        target = self.root / entry.path
        return (
            target.is_file()
            and target.stat().st_size == entry.size
            and sha256_of(target) == entry.sha256
        )

    def upload(self, entry: LocalFile, pool: ThreadPoolExecutor, progress: Progress) -> None:
        target = self.root / entry.path
        with disk_errors(target):
            self._copy(entry, target, progress)

    def _copy(self, entry: LocalFile, target: Path, progress: Progress) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.partial-")
        try:
            digest = hashlib.sha256()
            with open(entry.source, "rb") as src, os.fdopen(fd, "wb") as out:
                while block := src.read(READ_BLOCK):
                    out.write(block)
                    digest.update(block)
                    progress.add(len(block))
                out.flush()
                os.fsync(out.fileno())
            if digest.hexdigest() != entry.sha256 or sha256_of(Path(tmp)) != entry.sha256:
                raise UserError(f"{entry.source}: changed while it was being pushed")
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def write_manifest(self, data: bytes) -> None:
        write_file(self.root / MANIFEST, data)


def _b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode()


@dataclass(frozen=True)
class Encryption:
    """Server-side encryption asked for on every object (`output.sse`, `output.sse_kms_key_id`)."""

    sse: str | None = None
    kms_key_id: str | None = None

    def args(self) -> dict[str, str]:
        """The request parameters of PutObject and CreateMultipartUpload (S3 applies them to
        every part of a multipart upload; UploadPart takes them only for SSE-C)."""
        if not self.sse:
            return {}
        args = {"ServerSideEncryption": self.sse}
        if self.kms_key_id:
            args["SSEKMSKeyId"] = self.kms_key_id
        return args

    def kept(self, response: dict) -> bool:
        """Whether S3's answer (HEAD, PUT, UploadPart) says the object is stored as asked."""
        if not self.sse:
            return True
        if response.get("ServerSideEncryption") != self.sse:
            return False
        key = response.get("SSEKMSKeyId")
        # S3 answers with the key's ARN when it was asked for by id or alias
        return not self.kms_key_id or key is None or key.endswith(self.kms_key_id.split("/")[-1])


class LocalLease:
    """A folder destination needs no lease: nothing to claim, nothing to check."""

    def acquire(self) -> None:
        pass

    def check_held(self) -> None:
        pass

    def release(self) -> None:
        pass


class S3Destination:
    def __init__(
        self, uri: str, part_size: int, workers: int, encryption: Encryption | None = None
    ):
        self.uri = uri.rstrip("/")
        self.bucket, self.prefix = split_s3(uri)
        self.part_size = part_size
        self.client = s3_client(pool=workers + 2)
        self.encryption = encryption or Encryption()

    def lease(self, files: list[LocalFile]):
        from .lock import PushLock, content_key

        return PushLock(self, content_key(files))

    def key(self, path: str) -> str:
        return s3_key(self.prefix, path)

    def check(self) -> None:
        # Lists one key: this fails with the real reason (no bucket, bad credentials, no
        # endpoint) before anything is hashed or sent.
        self.client.list_objects_v2(Bucket=self.bucket, Prefix=self.key(""), MaxKeys=1)

    def remove_manifest(self) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self.key(MANIFEST))

    def _head(self, key: str) -> dict | None:
        from botocore.exceptions import ClientError

        try:
            return self.client.head_object(Bucket=self.bucket, Key=key, ChecksumMode="ENABLED")
        except ClientError as exc:
            if is_not_found(exc):
                return None
            raise

    def verified(self, entry: LocalFile, head: dict | None) -> bool:
        """Whether the stored object is exactly this file, by the server's own digests."""
        if head is None or head.get("ContentLength") != entry.size:
            return False
        if not self.encryption.kept(head):  # stored unencrypted (or with another key): again
            return False
        if head.get("Metadata", {}).get("sha256") != entry.sha256:
            return False
        etag = head.get("ETag", "").strip('"')
        checksum = head.get("ChecksumSHA256")
        # Composite checksums of multipart objects come with or without the "-N" suffix.
        if (
            checksum is not None
            and checksum.split("-")[0] != entry.expected_checksum().split("-")[0]
        ):
            return False
        # An MD5 ETag (every store but SSE-KMS buckets) is the server's digest of what it kept.
        if re.fullmatch(r"[0-9a-f]{32}(-[0-9]+)?", etag):
            return etag == entry.expected_etag()
        return checksum is not None

    def present(self, entry: LocalFile) -> bool:
        return self.verified(entry, self._head(self.key(entry.path)))

    def _read_part(self, entry: LocalFile, number: int) -> bytes:
        step = part_size_for(entry.size, self.part_size)
        with open(entry.source, "rb") as f:
            f.seek((number - 1) * step)
            return f.read(step)

    def upload(self, entry: LocalFile, pool: ThreadPoolExecutor, progress: Progress) -> None:
        key = self.key(entry.path)
        if not entry.multipart:
            body = entry.source.read_bytes()
            self.client.put_object(
                Bucket=self.bucket,
                Key=key,
                Body=body,
                ContentMD5=_b64(entry.md5),
                ChecksumSHA256=_b64(bytes.fromhex(entry.sha256)),
                Metadata={"sha256": entry.sha256},
                **self.encryption.args(),
            )
            progress.add(entry.size)
        else:
            self._multipart(entry, key, pool, progress)
        if not self.present(entry):
            raise UserError(
                f"{self.uri}/{entry.path}: the stored object does not match {entry.source} "
                "(size or checksum differs after upload)"
            )

    def _resumable(self, key: str, entry: LocalFile) -> tuple[str | None, dict[int, str]]:
        """An unfinished upload of this key whose parts all match ours, and those parts."""
        uploads = self.client.list_multipart_uploads(Bucket=self.bucket, Prefix=key)
        found, done = None, {}
        for upload in uploads.get("Uploads", []):
            if upload["Key"] != key:
                continue
            parts = self.client.list_parts(Bucket=self.bucket, Key=key, UploadId=upload["UploadId"])
            good = {}
            for part in parts.get("Parts", []):
                n = part["PartNumber"]
                if (
                    n <= len(entry.part_md5)
                    and part["ETag"].strip('"') == entry.part_md5[n - 1].hex()
                ):
                    good[n] = part["ETag"]
            if found is None and len(good) == len(parts.get("Parts", [])):
                found, done = upload["UploadId"], good
            else:  # another file's leftovers: not ours to finish
                self.client.abort_multipart_upload(
                    Bucket=self.bucket, Key=key, UploadId=upload["UploadId"]
                )
        return found, done

    def _multipart(
        self, entry: LocalFile, key: str, pool: ThreadPoolExecutor, progress: Progress
    ) -> None:
        upload_id, etags = self._resumable(key, entry)
        if upload_id is None:
            upload_id = self.client.create_multipart_upload(
                Bucket=self.bucket,
                Key=key,
                ChecksumAlgorithm="SHA256",
                Metadata={"sha256": entry.sha256},
                **self.encryption.args(),
            )["UploadId"]
        step = part_size_for(entry.size, self.part_size)
        for n in etags:
            progress.add(min(step, entry.size - (n - 1) * step))

        def send(n: int) -> tuple[int, str]:
            body = self._read_part(entry, n)
            response = self.client.upload_part(
                Bucket=self.bucket,
                Key=key,
                UploadId=upload_id,
                PartNumber=n,
                Body=body,
                ContentMD5=_b64(entry.part_md5[n - 1]),
                ChecksumSHA256=_b64(entry.part_sha256[n - 1]),
            )
            if response["ETag"].strip('"') != entry.part_md5[n - 1].hex():
                raise UserError(f"{self.uri}/{entry.path}: part {n} arrived corrupted")
            if not self.encryption.kept(response):
                raise UserError(
                    f"{self.uri}/{entry.path}: part {n} was not stored with server-side "
                    f"encryption {self.encryption.sse} (S3 answered "
                    f"{response.get('ServerSideEncryption')})"
                )
            progress.add(len(body))
            return n, response["ETag"]

        todo = [n for n in range(1, len(entry.part_md5) + 1) if n not in etags]
        for n, etag in pool.map(send, todo):
            etags[n] = etag
        # An upload left unfinished is kept on purpose: the next push resumes it.
        self.client.complete_multipart_upload(
            Bucket=self.bucket,
            Key=key,
            UploadId=upload_id,
            MultipartUpload={
                "Parts": [
                    {
                        "PartNumber": n,
                        "ETag": etags[n],
                        "ChecksumSHA256": _b64(entry.part_sha256[n - 1]),
                    }
                    for n in sorted(etags)
                ]
            },
        )

    def _stored(self, name: str) -> bytes | None:
        from botocore.exceptions import ClientError

        try:
            found = self.client.get_object(Bucket=self.bucket, Key=self.key(name))
        except ClientError:
            return None
        return found["Body"].read()

    def write_manifest(self, data: bytes) -> None:
        """Write manifest.json only where none is (If-None-Match: the push removed the old one
        while holding the prefix, so one there now is another push's)."""
        from botocore.exceptions import ClientError

        from .lock import precondition_failed

        try:
            response = self.client.put_object(
                Bucket=self.bucket,
                Key=self.key(MANIFEST),
                Body=data,
                ContentType="application/json",
                ContentMD5=_b64(md5(data).digest()),
                ChecksumSHA256=_b64(hashlib.sha256(data).digest()),
                IfNoneMatch="*",
                **self.encryption.args(),
            )
        except ClientError as exc:
            if not precondition_failed(exc):
                raise
            if self._stored(MANIFEST) == data:
                # This push's own write: it landed, its answer was lost, and the client's
                # retry met it (If-None-Match). The bytes are exactly what was sent.
                return
            raise UserError(
                f"{self.uri}/{MANIFEST}: another push wrote its manifest here while this one was "
                "uploading; this push left it as it is"
            ) from None
        etag = response.get("ETag", "").strip('"')
        if re.fullmatch(r"[0-9a-f]{32}", etag) and etag != md5(data).hexdigest():
            raise UserError(f"{self.uri}/{MANIFEST}: stored copy does not match what was sent")


def destination(dest: str, part_size: int, workers: int, encryption: Encryption | None = None):
    if is_s3(dest):
        return S3Destination(dest, part_size, workers, encryption)
    if encryption is not None and encryption.sse:
        raise UserError(f"{dest}: server-side encryption (output.sse) applies to s3:// only")
    return LocalDestination(Path(dest))


def check_workers(workers: int) -> None:
    if workers < 1:
        raise UserError(f"--workers must be at least 1, got {workers}")
