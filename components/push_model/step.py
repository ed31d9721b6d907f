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

Concurrent pushes: an S3 push holds a lease on its prefix (lock.py) from before it changes
anything until after the manifest, which is written with `If-None-Match: *`; a push of another
model to the same prefix stops before changing anything. `encryption` (output.sse) asks for
server-side encryption on every object the push writes.

This file is the push itself; its pieces: files.py (what is sent and its digests), upload.py
(the folder and S3 destinations, upload, resume and verification, encryption), lock.py (the
lease), manifest.py (what manifest.json says), pull.py (the way back).
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..errors import UserError
from ..storage import s3_errors
from .files import DEFAULT_PART_SIZE, MIN_PART_SIZE, MiB, hash_file, model_files
from .manifest import build_manifest, describe_model
from .pull import pull
from .upload import Encryption, Progress, check_workers, destination

__all__ = ["pull", "push"]


def push(
    src_dir: str | Path,
    dest: str,
    evaluation: dict | None = None,
    part_size: int = DEFAULT_PART_SIZE,
    workers: int = 8,
    register=None,
    encryption: Encryption | None = None,
) -> dict:
    """Upload every file of src_dir to dest, verify each, then write manifest.json; returns a
    summary (files, bytes uploaded and skipped, seconds, the manifest). `register(manifest)`,
    when given, runs after the uploads and before the manifest, which records what it returns
    under "registry"; when it fails the manifest says so (the model stays pushed) and the
    error is raised after the manifest is written."""
    src = Path(src_dir)
    check_workers(workers)
    if part_size < MIN_PART_SIZE:
        raise UserError(f"part size must be at least {MIN_PART_SIZE // MiB} MiB")
    files = model_files(src)
    started = time.monotonic()
    target = destination(dest, part_size, workers, encryption)
    with s3_errors(dest):
        target.check()
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(lambda f: hash_file(f, part_size), files))
        manifest = build_manifest(files, describe_model(src, evaluation))
        lease = target.lease(files)
        lease.acquire()  # one push per prefix from here (lock.py)
        try:
            todo = _upload(target, files, workers, dest)
            failure = None
            if register is not None:
                try:
                    manifest["registry"] = register(manifest)
                except UserError as exc:
                    failure = exc
                    manifest["registry"] = {"registered": False, "error": str(exc)}
            lease.check_held()
            target.write_manifest((json.dumps(manifest, indent=1) + "\n").encode())
        finally:
            lease.release()
    if failure is not None:
        raise UserError(
            f"{failure}. The model is pushed to {dest} (its manifest.json says it is not "
            "registered); register it again once the registry answers"
        )
    return {
        "files": len(files),
        "uploaded": len(todo),
        "skipped": len(files) - len(todo),
        "bytes_uploaded": sum(f.size for f in todo),
        "total_bytes": manifest["total_bytes"],
        "seconds": round(time.monotonic() - started, 3),
        "manifest": manifest,
    }


def _upload(target, files: list, workers: int, dest: str) -> list:
    """Remove the old manifest, then upload every file not already there; the files sent."""
    target.remove_manifest()  # from here on no manifest names a changing object
    with ThreadPoolExecutor(workers) as pool:
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
    return todo
