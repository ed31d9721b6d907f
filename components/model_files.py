"""Checks on a model folder before anything reads it, against damaged or hostile files.

- A safetensors file whose header claims an absurd size (or tensors outside the file) is
  refused after reading its first 8 bytes (and a header of at most MAX_HEADER_BYTES): nothing
  allocates what the file claims.
- A symbolic link that points outside the model folder is refused (a pushed or pulled folder
  could otherwise read, or ship, any file of the machine). A Hugging Face cache snapshot's
  links into its own repository folder (`../../blobs/...`) are fine.
- Tokenizer and config files over a bound are refused by their size, before they are read:
  tokenizer files over MAX_TOKENIZER_BYTES (the largest real tokenizer.json, Gemma's, is
  about 35 MB), other JSON over MAX_JSON_BYTES.

Standard library only: prepare and push call it without loading torch.
"""

from __future__ import annotations

import json
import os
import struct
from functools import lru_cache
from pathlib import Path

from .errors import UserError

MiB = 1024 * 1024
MAX_HEADER_BYTES = 16 * MiB  # safetensors itself allows 100 MB; real headers are KBs
MAX_TOKENIZER_BYTES = 128 * MiB
MAX_JSON_BYTES = 16 * MiB
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt")
DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2,
    "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip


def _mib(n: int) -> str:
    return f"{n / MiB:,.0f} MiB"


def check_safetensors(path: Path) -> None:
    """The header fits the bound and the file, and every tensor lies inside the file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise UserError(f"{path}: not a safetensors file ({size} bytes, no header)")
        (length,) = struct.unpack("<Q", head)
        if length > MAX_HEADER_BYTES or 8 + length > size:
            raise UserError(
                f"{path}: its safetensors header claims {length:,} bytes (the file has "
                f"{size:,}; headers are refused over {_mib(MAX_HEADER_BYTES)}): a damaged or "
                "hostile file, not read"
            )
        raw = f.read(length)
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("not an object")
    except (ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not a safetensors file (its header is not JSON: {exc})") from None
    data = size - 8 - length
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            start, end = (int(x) for x in info["data_offsets"])
            count = 1
            for d in info["shape"]:
                count *= int(d)
            width = DTYPE_BYTES.get(info["dtype"])
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{path}: tensor {name!r} has no valid dtype/shape/offsets") from None
        if not 0 <= start <= end <= data or (width is not None and (end - start) != count * width):
            raise UserError(
                f"{path}: tensor {name!r} claims bytes {start}..{end} of {data} (shape "
                f"{info['shape']}, {info['dtype']}): a damaged or hostile file, not read"
            )


def _inside(target: Path, roots: list[Path]) -> bool:
    return any(target == root or target.is_relative_to(root) for root in roots)


@lru_cache(maxsize=64)
def _check(folder: str, _mtime: float) -> None:
    root = Path(folder).resolve()
    roots = [root]
    if root.parent.name == "snapshots":  # a hub cache snapshot links into ../../blobs
        roots.append(root.parent.parent)
    for here, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = Path(here) / name
            if path.is_symlink():
                target = path.resolve()
                if not _inside(target, roots):
                    raise UserError(
                        f"{path}: a symbolic link to {target}, outside the model folder "
                        f"{folder}; copy the file into the folder instead"
                    )
        if here == folder and "checkpoints" in dirs:
            dirs.remove("checkpoints")  # training's resume state: never loaded as a model
        for name in files:
            path = Path(here) / name
            if not path.is_file():
                continue
            size = path.stat().st_size
            if name in TOKENIZER_FILES and size > MAX_TOKENIZER_BYTES:
                raise UserError(
                    f"{path}: {size:,} bytes, over the {_mib(MAX_TOKENIZER_BYTES)} bound for a "
                    "tokenizer file; refused before reading it"
                )
            if name.endswith(".json") and name not in TOKENIZER_FILES and size > MAX_JSON_BYTES:
                raise UserError(
                    f"{path}: {size:,} bytes, over the {_mib(MAX_JSON_BYTES)} bound for a "
                    "model's JSON file; refused before reading it"
                )
            if name.endswith(".safetensors"):
                check_safetensors(path)


def check_model_folder(folder: Path | str) -> None:
    """Raise UserError naming the file when the folder holds a hostile or damaged file (see
    the module's text); checked once per folder and modification time."""
    path = Path(folder)
    if path.is_dir():
        _check(str(path), path.stat().st_mtime)
