"""The files of a model folder that a push sends, and their digests: SHA-256 of each file and
MD5/SHA-256 of each part (the digests S3 returns for single and multipart objects), in one read."""

from __future__ import annotations

import base64
import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from ..model_files import check_model_folder
from .manifest import MANIFEST

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
            return md5(b"".join(self.part_md5)).hexdigest() + f"-{len(self.part_md5)}"
        return self.md5.hex()

    def expected_checksum(self) -> str:
        """S3's ChecksumSHA256 of the object: whole-file, or composite for multipart."""
        if self.multipart:
            digest = hashlib.sha256(b"".join(self.part_sha256)).digest()
            return base64.b64encode(digest).decode() + f"-{len(self.part_sha256)}"
        return base64.b64encode(bytes.fromhex(self.sha256)).decode()


def md5(data: bytes = b"") -> hashlib._Hash:
    """MD5 for S3's Content-MD5 and ETags: an integrity check, not security, so it works on a
    FIPS-mode host, where a plain hashlib.md5() raises."""
    return hashlib.md5(data, usedforsecurity=False)


def part_size_for(size: int, part_size: int) -> int:
    """The part size actually used: at least S3's minimum, few enough parts for S3's limit."""
    needed = math.ceil(size / MAX_PARTS)
    return max(part_size, MIN_PART_SIZE, math.ceil(needed / MiB) * MiB)


def model_files(src: Path) -> list[LocalFile]:
    """Every file of a model folder that belongs in the push (no hidden files, no checkpoints)."""
    if not src.is_dir():
        raise UserError(f"{src}: no such folder")
    check_model_folder(src)  # no link out of the folder is pushed, no hostile file shipped
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
    whole_md5, part_md5, part_sha = md5(), [], []
    step = part_size_for(entry.size, part_size)
    with open(entry.source, "rb") as f:
        while True:
            part = f.read(step)
            if not part:
                break
            whole.update(part)
            whole_md5.update(part)
            part_md5.append(md5(part).digest())
            part_sha.append(hashlib.sha256(part).digest())
    entry.sha256, entry.md5 = whole.hexdigest(), whole_md5.digest()
    if entry.size > part_size:
        entry.part_md5, entry.part_sha256 = part_md5, part_sha


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(READ_BLOCK):
            digest.update(block)
    return digest.hexdigest()
