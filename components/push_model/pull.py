"""pull: download a pushed model only when its manifest is there, and create the folder only when
every file's size and SHA-256 match it."""

from __future__ import annotations

import json
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..errors import UserError
from ..outputs import check_output, staged_output
from ..storage import is_not_found, is_s3, s3_client, s3_errors, s3_key, split_s3
from .files import sha256_of
from .manifest import MANIFEST, MANIFEST_FORMAT
from .upload import Progress, check_workers

SHA256 = re.compile(r"[0-9a-f]{64}")


def check_entry(item, where: str, seen: set[str]) -> None:
    """One `files` entry of a manifest: a safe relative path listed once, a size and a SHA-256."""
    if not isinstance(item, dict):
        raise ValueError(f"{where}: an object with path, size and sha256 expected")
    path, size, digest = item.get("path"), item.get("size"), item.get("sha256")
    if not isinstance(path, str) or not path:
        raise ValueError(f"{where}: no path")
    if ".." in Path(path).parts or Path(path).is_absolute():
        raise ValueError(f"{where}: unsafe path {path!r}")
    if path in seen:
        raise ValueError(f"{where}: {path} is listed twice")
    seen.add(path)
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ValueError(f"{where} ({path}): size must be a whole number of bytes, got {size!r}")
    if not isinstance(digest, str) or not SHA256.fullmatch(digest):
        raise ValueError(f"{where} ({path}): no sha256 checksum (64 hex digits), got {digest!r}")


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
        if not isinstance(manifest, dict):
            raise ValueError(f"a JSON object expected, got {type(manifest).__name__}")
        if manifest.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"format {manifest.get('format')!r}")
        files = manifest.get("files")
        if not isinstance(files, list):
            raise ValueError("'files' must be a list")
        seen: set[str] = set()
        for n, item in enumerate(files):
            check_entry(item, f"files[{n}]", seen)
    except ValueError as exc:
        raise UserError(f"{source}/{MANIFEST}: not a kubetune manifest ({exc})") from None
    return manifest


def pull(source: str, dest_dir: str | Path, overwrite: bool = False, workers: int = 8) -> dict:
    """Download a pushed model into dest_dir, only if its manifest is there and every file's
    size and SHA-256 match it; dest_dir appears complete or not at all."""
    dest = Path(dest_dir)
    check_workers(workers)
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
                    key = s3_key(prefix or "", item["path"])
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
