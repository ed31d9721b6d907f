"""push_model / pull: copy a finished model to `s3://bucket/prefix` (or a folder) so that consumers
can trust it, and copy it back only when it is whole.

The contract with consumers is `manifest.json`: it lists every file with its size and SHA-256,
and it is written **last**, after every listed object has been uploaded and verified. A push
first removes an old manifest from the destination, so at no moment does a manifest name an
object that is missing, incomplete or from another push.

Uploads: files up to `part_size` go in one PUT, larger ones as multipart uploads whose parts are
sent in parallel. Every request carries the SHA-256 of its bytes (`ChecksumSHA256`, which S3
verifies on arrival), each object records its whole-file SHA-256 in its metadata, and each
upload is verified against the server's ETag (the MD5 of what it stored, or the MD5 of the
parts' MD5s for multipart) and, where the store returns it, the SHA-256 checksum. A re-run
skips objects already there with the right size and checksums, and continues an unfinished
multipart upload from the parts whose MD5 matches.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from .. import __version__
from ..errors import UserError
from ..outputs import check_output, staged_output
from ..storage import is_not_found, is_s3, s3_client, s3_errors, s3_key, split_s3

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "kubetune.manifest/v1"
MiB = 1024 * 1024
DEFAULT_PART_SIZE = 64 * MiB
MIN_PART_SIZE = 5 * MiB  # S3's smallest part (all but the last)
MAX_PARTS = 10_000
SKIPPED_DIRS = ("checkpoints",)  # resume state of training, not part of a model
READ_BLOCK = 8 * MiB


@dataclass
class LocalFile:
    path: str  # relative, with forward slashes: the object key under the prefix
    source: Path
    size: int
    sha256: str = ""
    part_md5: list[bytes] = field(default_factory=list)  # one digest per part (multipart)
    part_sha256: list[bytes] = field(default_factory=list)
    md5: bytes = b""

    @property
    def multipart(self) -> bool:
        return len(self.part_md5) > 1

    def expected_etag(self) -> str:
        if self.multipart:
            return hashlib.md5(b"".join(self.part_md5)).hexdigest() + f"-{len(self.part_md5)}"
        return self.md5.hex()

    def expected_checksum(self) -> str:
        """S3's ChecksumSHA256 of the object: whole-file, or composite for multipart."""
        if self.multipart:
            digest = hashlib.sha256(b"".join(self.part_sha256)).digest()
            return base64.b64encode(digest).decode() + f"-{len(self.part_sha256)}"
        return base64.b64encode(bytes.fromhex(self.sha256)).decode()


def part_size_for(size: int, part_size: int) -> int:
    """The part size actually used: at least S3's minimum, few enough parts for S3's limit."""
    needed = math.ceil(size / MAX_PARTS)
    return max(part_size, MIN_PART_SIZE, math.ceil(needed / MiB) * MiB)


def model_files(src: Path) -> list[LocalFile]:
    """Every file of a model folder that belongs in the push (no hidden files, no checkpoints)."""
    if not src.is_dir():
        raise UserError(f"{src}: no such folder")
    files = []
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src)
        if not path.is_file() or any(p.startswith(".") for p in rel.parts):
            continue
        if rel.parts[0] in SKIPPED_DIRS or rel.as_posix() == MANIFEST:
            continue
        files.append(LocalFile(rel.as_posix(), path, path.stat().st_size))
    if not files:
        raise UserError(f"{src}: nothing to push (the folder is empty)")
    return files


def hash_file(entry: LocalFile, part_size: int) -> None:
    """SHA-256 of the file and MD5/SHA-256 of each part, in one read."""
    whole = hashlib.sha256()
    md5, part_md5, part_sha = hashlib.md5(), [], []
    step = part_size_for(entry.size, part_size)
    with open(entry.source, "rb") as f:
        while True:
            part = f.read(step)
            if not part:
                break
            whole.update(part)
            md5.update(part)
            part_md5.append(hashlib.md5(part).digest())
            part_sha.append(hashlib.sha256(part).digest())
    entry.sha256, entry.md5 = whole.hexdigest(), md5.digest()
    if entry.size > part_size:
        entry.part_md5, entry.part_sha256 = part_md5, part_sha


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(READ_BLOCK):
            digest.update(block)
    return digest.hexdigest()


# --- what the manifest says about the model ------------------------------------------------


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _base_model(name_or_path: str | None, record: dict) -> dict:
    """The manifest's base_model: name, requested revision, fetched commit (or digest)."""
    return {
        "name_or_path": name_or_path,
        "revision": record.get("revision"),
        "commit": record.get("commit"),
    }


def describe_model(src: Path, evaluation: dict | None) -> dict:
    """Provenance of a model folder written by kubetune train or merge."""
    import yaml

    merge = _read_json(src / "merge.json")
    base = _read_json(src / "base_model.json")
    recipe_file = src / "recipe.yaml"
    recipe = yaml.safe_load(recipe_file.read_text()) if recipe_file.is_file() else None
    if merge is not None:
        kind = "merged"
    elif (src / "adapter_config.json").is_file() or (src / "kubetune_adapter.json").is_file():
        kind = "adapter"
    elif (src / "config.json").is_file():
        kind = "full"
    else:
        kind = "files"
    if merge is not None:
        base_model = _base_model(merge["base"], merge)
        fingerprint = merge.get("dataset_fingerprint")
    elif base is not None:
        base_model = _base_model(base["name_or_path"], base)
        fingerprint = base.get("dataset_fingerprint")
    else:
        model = (recipe or {}).get("model", {})
        base_model = _base_model(model.get("name_or_path"), model)
        fingerprint = None
    training = _read_json(src / "training_metrics.json") or (
        _read_json(src / "metrics.json") if kind != "files" else None
    )
    if training is not None:
        history = training.pop("loss", None) or []
        training["final_loss"] = history[-1][1] if history else None
    return {
        "kind": kind,
        "base_model": base_model,
        "adapter": merge.get("adapter") if merge else None,
        "method": (recipe or {}).get("method"),
        "dataset_fingerprint": fingerprint,
        "recipe": recipe,
        "metrics": {"training": training, "evaluation": evaluation},
    }


def build_manifest(files: list[LocalFile], description: dict) -> dict:
    return {
        "format": MANIFEST_FORMAT,
        "kubetune_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **description,
        "total_bytes": sum(f.size for f in files),
        "files": [{"path": f.path, "size": f.size, "sha256": f.sha256} for f in files],
    }


# --- destinations ---------------------------------------------------------------------------


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
        self.root.mkdir(parents=True, exist_ok=True)

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
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=f".{MANIFEST}.partial-")
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, self.root / MANIFEST)


def _b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode()


class S3Destination:
    def __init__(self, uri: str, part_size: int, workers: int):
        self.uri = uri.rstrip("/")
        self.bucket, self.prefix = split_s3(uri)
        self.part_size = part_size
        self.client = s3_client(pool=workers + 2)

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

    def write_manifest(self, data: bytes) -> None:
        response = self.client.put_object(
            Bucket=self.bucket,
            Key=self.key(MANIFEST),
            Body=data,
            ContentType="application/json",
            ContentMD5=_b64(hashlib.md5(data).digest()),
            ChecksumSHA256=_b64(hashlib.sha256(data).digest()),
        )
        etag = response.get("ETag", "").strip('"')
        if re.fullmatch(r"[0-9a-f]{32}", etag) and etag != hashlib.md5(data).hexdigest():
            raise UserError(f"{self.uri}/{MANIFEST}: stored copy does not match what was sent")


def _destination(dest: str, part_size: int, workers: int):
    return S3Destination(dest, part_size, workers) if is_s3(dest) else LocalDestination(Path(dest))


def _check_workers(workers: int) -> None:
    if workers < 1:
        raise UserError(f"--workers must be at least 1, got {workers}")


def push(
    src_dir: str | Path,
    dest: str,
    evaluation: dict | None = None,
    part_size: int = DEFAULT_PART_SIZE,
    workers: int = 8,
) -> dict:
    """Upload every file of src_dir to dest, verify each, then write manifest.json; returns a
    summary (files, bytes uploaded and skipped, seconds, the manifest)."""
    src = Path(src_dir)
    _check_workers(workers)
    if part_size < MIN_PART_SIZE:
        raise UserError(f"part size must be at least {MIN_PART_SIZE // MiB} MiB")
    files = model_files(src)
    started = time.monotonic()
    target = _destination(dest, part_size, workers)
    with s3_errors(dest):
        target.check()
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(lambda f: hash_file(f, part_size), files))
            manifest = build_manifest(files, describe_model(src, evaluation))
            target.remove_manifest()  # from here on no manifest names a changing object
            present = list(pool.map(target.present, files))
            todo = [f for f, ok in zip(files, present, strict=True) if not ok]
            progress = Progress(sum(f.size for f in todo), f"push {dest}")
            try:
                singles = [f for f in todo if not f.multipart]
                list(pool.map(lambda f: target.upload(f, pool, progress), singles))
                for entry in sorted((f for f in todo if f.multipart), key=lambda f: -f.size):
                    target.upload(entry, pool, progress)  # its parts go through the pool
            finally:
                progress.close()
        target.write_manifest((json.dumps(manifest, indent=1) + "\n").encode())
    return {
        "files": len(files),
        "uploaded": len(todo),
        "skipped": len(files) - len(todo),
        "bytes_uploaded": sum(f.size for f in todo),
        "total_bytes": manifest["total_bytes"],
        "seconds": round(time.monotonic() - started, 3),
        "manifest": manifest,
    }


# --- pull -----------------------------------------------------------------------------------


def _fetch_manifest(source: str) -> dict:
    if is_s3(source):
        from botocore.exceptions import ClientError

        bucket, prefix = split_s3(source)
        key = s3_key(prefix, MANIFEST)
        try:
            body = s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()
        except ClientError as exc:
            if is_not_found(exc):
                body = None
            else:
                raise
    else:
        path = Path(source) / MANIFEST
        body = path.read_bytes() if path.is_file() else None
    if body is None:
        raise UserError(
            f"{source}: no {MANIFEST} (nothing was pushed there, or the push did not finish)"
        )
    try:
        manifest = json.loads(body)
        files = manifest["files"]
        if manifest.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"format {manifest.get('format')!r}")
        for item in files:
            if ".." in Path(item["path"]).parts or Path(item["path"]).is_absolute():
                raise ValueError(f"unsafe path {item['path']!r}")
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{source}/{MANIFEST}: not a kubetune manifest ({exc})") from None
    return manifest


def pull(source: str, dest_dir: str | Path, overwrite: bool = False, workers: int = 8) -> dict:
    """Download a pushed model into dest_dir, only if its manifest is there and every file's
    size and SHA-256 match it; dest_dir appears complete or not at all."""
    dest = Path(dest_dir)
    _check_workers(workers)
    check_output(dest, overwrite)
    source = source.rstrip("/")
    with s3_errors(source):
        manifest = _fetch_manifest(source)
        with staged_output(dest, overwrite) as staging:
            client = s3_client(pool=workers + 2) if is_s3(source) else None
            bucket, prefix = split_s3(source) if is_s3(source) else (None, None)
            progress = Progress(manifest.get("total_bytes", 0), f"pull {source}")

            def fetch(item: dict) -> None:
                target = staging / item["path"]
                target.parent.mkdir(parents=True, exist_ok=True)
                if client is not None:
                    key = s3_key(prefix, item["path"])
                    from botocore.exceptions import ClientError

                    try:
                        client.download_file(bucket, key, str(target))
                    except ClientError as exc:
                        if is_not_found(exc):
                            raise UserError(
                                f"{source}/{item['path']}: listed in {MANIFEST} but missing"
                            ) from None
                        raise
                else:
                    origin = Path(source) / item["path"]
                    if not origin.is_file():
                        raise UserError(f"{origin}: listed in {MANIFEST} but missing")
                    shutil.copyfile(origin, target)
                size, digest = target.stat().st_size, sha256_of(target)
                if size != item["size"] or digest != item["sha256"]:
                    raise UserError(
                        f"{source}/{item['path']}: does not match {MANIFEST} "
                        f"(size {size} vs {item['size']}, sha256 {digest[:12]} vs "
                        f"{item['sha256'][:12]})"
                    )
                progress.add(size)

            try:
                with ThreadPoolExecutor(workers) as pool:
                    list(pool.map(fetch, manifest["files"]))
            finally:
                progress.close()
            (staging / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return {"files": len(manifest["files"]), "total_bytes": manifest.get("total_bytes")}
