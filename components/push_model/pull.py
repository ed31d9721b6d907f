"""pull: download a pushed model only when its manifest is there, and create the folder only when
every file's size and SHA-256 match it."""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..errors import UserError
from ..outputs import check_output, staged_output
from ..storage import is_not_found, is_s3, s3_client, s3_errors, s3_key, split_s3
from .files import sha256_of
from .manifest import MANIFEST, MANIFEST_FORMAT
from .upload import Progress, check_workers


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
