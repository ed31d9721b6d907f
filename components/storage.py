"""Where inputs come from: local paths and `s3://` URIs (boto3, standard AWS environment).

The endpoint comes from boto3's own configuration, so `AWS_ENDPOINT_URL_S3` reaches MinIO or
any S3-compatible store. Downloads land in a temporary name and are renamed when complete.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import UserError

S3_SCHEME = "s3://"
CREDENTIAL_ERRORS = ("InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken")


def is_s3(uri: str) -> bool:
    return uri.startswith(S3_SCHEME)


def split_s3(uri: str) -> tuple[str, str]:
    bucket, _, key = uri[len(S3_SCHEME) :].partition("/")
    if not bucket:
        raise UserError(f"{uri}: an S3 URI needs a bucket (s3://bucket/key)")
    return bucket, key


def s3_client(pool: int = 10):
    """A boto3 S3 client from the standard AWS environment/config, with bounded retries
    (`AWS_MAX_ATTEMPTS`, default 5, standard retry mode)."""
    import boto3
    from botocore.config import Config

    try:
        attempts = max(1, int(os.environ.get("AWS_MAX_ATTEMPTS", "5")))
    except ValueError:
        raise UserError("AWS_MAX_ATTEMPTS must be a whole number") from None

    return boto3.client(
        "s3",
        config=Config(
            max_pool_connections=pool,
            retries={"max_attempts": attempts, "mode": "standard"},
            connect_timeout=10,
            read_timeout=120,
        ),
    )


def _explain(uri: str, exc: Exception) -> UserError:
    from botocore.exceptions import ClientError, HTTPClientError, NoCredentialsError
    from botocore.exceptions import ConnectionError as S3ConnectionError

    if isinstance(exc, NoCredentialsError):
        return UserError(
            f"{uri}: no AWS credentials (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a profile)"
        )
    if isinstance(exc, S3ConnectionError):
        return UserError(f"{uri}: cannot reach the S3 endpoint ({exc})")
    if isinstance(exc, HTTPClientError):
        return UserError(f"{uri}: the connection to the S3 endpoint was lost ({exc})")
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = error.get("Code", "?")
        if code in CREDENTIAL_ERRORS:
            return UserError(
                f"{uri}: S3 rejected the credentials ({code}); check AWS_ACCESS_KEY_ID/"
                "AWS_SECRET_ACCESS_KEY or the profile"
            )
        if code in ("NoSuchBucket",):
            return UserError(f"{uri}: the bucket does not exist")
        if code in ("AccessDenied", "403"):
            return UserError(f"{uri}: access denied by S3 ({error.get('Message') or code})")
        return UserError(f"{uri}: S3 refused the request ({code}: {error.get('Message', '')})")
    return UserError(f"{uri}: {exc}")


@contextmanager
def s3_errors(uri: str) -> Iterator[None]:
    """Turn boto errors inside the block into one-line user errors naming the URI."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except (BotoCoreError, ClientError) as exc:
        raise _explain(uri, exc) from None


def is_not_found(exc: Any) -> bool:
    """A ClientError for a missing key (HEAD answers a bare 404, GET NoSuchKey)."""
    return exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound")


def folder_prefix(key: str) -> str:
    """The listing prefix of the objects under `key` as a folder ("" stays "", "a" is "a/")."""
    return key if not key or key.endswith("/") else key + "/"


def s3_key(prefix: str, path: str) -> str:
    """The key of `path` under a prefix ("" or "a/b", slashes at the ends ignored)."""
    prefix = prefix.strip("/")
    return f"{prefix}/{path}" if prefix else path


def s3_download(uri: str, dest_dir: Path) -> Path:
    """Download one object, or every object under a prefix, into dest_dir; return the local path.

    A single object comes back as `dest_dir/<basename>`; a prefix as `dest_dir` holding the
    objects with their paths relative to the prefix.
    """
    from botocore.exceptions import ClientError

    bucket, key = split_s3(uri)
    client = s3_client()
    with s3_errors(uri):
        keys = []
        if key and not key.endswith("/"):
            try:
                client.head_object(Bucket=bucket, Key=key)
                keys = [key]
            except ClientError as exc:
                if not is_not_found(exc):
                    raise
        single = bool(keys)
        if not single:
            prefix = folder_prefix(key)
            for page in client.get_paginator("list_objects_v2").paginate(
                Bucket=bucket, Prefix=prefix
            ):
                keys += [o["Key"] for o in page.get("Contents", []) if not o["Key"].endswith("/")]
            if not keys:
                raise UserError(f"{uri}: no such object or prefix")
        dest_dir.mkdir(parents=True, exist_ok=True)
        for k in keys:
            rel = os.path.basename(k) if single else k[len(prefix) :]
            target = dest_dir / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".part-")
            os.close(fd)
            try:
                client.download_file(bucket, k, tmp)
                os.replace(tmp, target)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
    return dest_dir / os.path.basename(keys[0]) if single else dest_dir


def s3_cached(uri: str, cache: Path) -> Path:
    """Download uri once into cache/<sha of uri>; a half-finished download is never reused."""
    folder = cache / hashlib.sha256(uri.encode()).hexdigest()[:16]
    done = folder / ".complete"
    if done.is_file():
        return folder / done.read_text()
    shutil.rmtree(folder, ignore_errors=True)
    local = s3_download(uri, folder / "data")
    done.write_text(str(local.relative_to(folder)))
    return local
