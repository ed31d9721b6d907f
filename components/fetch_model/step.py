"""fetch_model: download a hub or `s3://` model once per revision into the workspace.

    WORKSPACE/models/NAME@REVISION/   config.json, *.safetensors, tokenizer files, .kubetune-fetch.json

- A hub revision (branch, tag, or none = main) is resolved to its commit before anything is
  downloaded; an S3 model's revision is a digest of its listing (keys, sizes, ETags), so a
  changed object is a new revision.
- Only safetensors, JSON configs and tokenizer files are fetched (Python files too when
  `model.trust_remote_code` is on). Pickle weights (.bin, .pt, .pth, .ckpt, .pkl) are never
  fetched: a model with no safetensors is refused.
- The files are downloaded into a staging folder beside the target and renamed into place
  when every file has its listed size, so a folder named NAME@REVISION is always complete.
  A later run reuses it after checking every file's size against the record; a folder that
  fails the check is moved aside and fetched again. Two runs fetching at once both stage;
  the first rename wins and the other discards its copy.
- Later steps and every PyTorchJob pod load from that folder (`model.local_dir`) with the
  hub turned off (`HF_HUB_OFFLINE=1`).

tiny:// models and local folders need no fetch: the recipe is returned unchanged.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import UserError
from ..storage import folder_prefix, is_s3, s3_client, s3_errors, split_s3
from ..tiny_models import is_tiny

if TYPE_CHECKING:
    from ..config import RunConfig

RECORD = ".kubetune-fetch.json"
MODELS_DIR = "models"
WANTED = (
    "*.safetensors",
    "*.safetensors.index.json",
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.json",
    "chat_template.jinja",
    "tokenizer.model",
    "*.tiktoken",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
)
PICKLE = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


@dataclass(frozen=True)
class Listing:
    """What a model source holds: file path -> size in bytes, and the revision's commit."""

    source: str
    revision: str | None
    commit: str
    files: dict[str, int]


def wanted_files(names: dict[str, int], source: str, remote_code: bool) -> dict[str, int]:
    """The files to fetch; refuses a model without safetensors or config.json."""
    patterns = WANTED + (("*.py",) if remote_code else ())
    keep = {
        n: size
        for n, size in names.items()
        if any(fnmatch.fnmatch(Path(n).name, p) for p in patterns) and "/." not in f"/{n}"
    }
    if "config.json" not in keep:
        raise UserError(f"model.name_or_path: {source} has no config.json")
    if not any(n.endswith(".safetensors") for n in keep):
        pickled = sorted(n for n in names if n.endswith(PICKLE))
        hint = f" (only pickle weights: {', '.join(pickled[:3])})" if pickled else ""
        raise UserError(
            f"model.name_or_path: {source} has no .safetensors weights{hint}; kubetune loads "
            "safetensors only, never pickle"
        )
    return keep


def slug(source: str) -> str:
    """A folder name for a model source: org/name -> org--name, s3://b/p -> s3--b--p."""
    text = source.removeprefix("s3://")
    text = ("s3--" if is_s3(source) else "") + "--".join(p for p in text.split("/") if p)
    return re.sub(r"[^A-Za-z0-9._-]", "_", text)


def list_s3(model_cfg) -> Listing:
    uri = model_cfg.name_or_path
    bucket, key = split_s3(uri)
    prefix = folder_prefix(key)
    found, digest = {}, hashlib.sha256()
    with s3_errors(uri):
        pages = s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        for page in pages:
            for obj in page.get("Contents", []):
                rel = obj["Key"][len(prefix) :]
                if rel and not rel.endswith("/"):
                    found[rel] = int(obj["Size"])
                    digest.update(f"{rel}\0{obj['Size']}\0{obj.get('ETag', '')}\n".encode())
    if not found:
        raise UserError(f"model.name_or_path: {uri} holds no objects")
    files = wanted_files(found, uri, model_cfg.trust_remote_code)
    return Listing(uri, model_cfg.revision, "s3-" + digest.hexdigest()[:16], files)


def list_hub(model_cfg) -> Listing:
    """The hub repo's commit for the requested revision, and its files' sizes."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo = model_cfg.name_or_path
    try:
        info = HfApi().model_info(repo, revision=model_cfg.revision, files_metadata=True)
    except RevisionNotFoundError:
        raise UserError(
            f"model.revision: {model_cfg.revision!r} is not a revision of {repo}"
        ) from None
    except GatedRepoError:
        raise UserError(
            f"model.name_or_path: {repo} is gated; accept its licence on the hub and give "
            "kubetune a token (HF_TOKEN, kubernetes.hf_secret)"
        ) from None
    except RepositoryNotFoundError:
        raise UserError(f"model.name_or_path: no hub model {repo!r} (or no access)") from None
    except (HfHubHTTPError, OSError) as exc:
        raise UserError(f"model.name_or_path: cannot reach the hub for {repo}: {exc}") from None
    sizes = {s.rfilename: int(s.size or 0) for s in info.siblings or []}
    files = wanted_files(sizes, repo, model_cfg.trust_remote_code)
    return Listing(repo, model_cfg.revision, info.sha, files)


def download_s3(listing: Listing, staging: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    bucket, key = split_s3(listing.source)
    prefix = folder_prefix(key)
    client = s3_client(pool=8)

    def one(rel: str) -> None:
        target = staging / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        client.download_file(bucket, prefix + rel, str(target))

    with s3_errors(listing.source), ThreadPoolExecutor(8) as pool:
        list(pool.map(one, sorted(listing.files)))


def download_hub(listing: Listing, staging: Path) -> None:
    """Each listed file at the resolved commit (never a branch name: a push to main while we
    download cannot mix two revisions)."""
    from concurrent.futures import ThreadPoolExecutor

    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError

    def one(rel: str) -> None:
        hf_hub_download(listing.source, rel, revision=listing.commit, local_dir=staging)

    try:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(one, sorted(listing.files)))
    except (HfHubHTTPError, OSError) as exc:
        raise UserError(f"model.name_or_path: download of {listing.source} failed: {exc}") from None
    shutil.rmtree(staging / ".cache", ignore_errors=True)  # huggingface_hub's own bookkeeping


def complete(folder: Path) -> bool:
    """A fetched folder whose record exists and whose every file has its recorded size."""
    try:
        record = json.loads((folder / RECORD).read_text())
        return all(
            (folder / rel).is_file() and (folder / rel).stat().st_size == size
            for rel, size in record["files"].items()
        )
    except (OSError, ValueError, KeyError):
        return False


def fetch(model_cfg, workspace: str | Path) -> dict | None:
    """Make WORKSPACE/models/NAME@REVISION hold the model; returns its record (source,
    revision, commit, path, files, downloaded) or None when the model needs no fetch."""
    name = model_cfg.name_or_path
    if is_tiny(name) or Path(name).expanduser().exists() or name.startswith((".", "/", "~")):
        return None
    listing = list_s3(model_cfg) if is_s3(name) else list_hub(model_cfg)
    root = Path(workspace).absolute() / MODELS_DIR
    target = root / f"{slug(name)}@{listing.commit}"
    if complete(target):
        record = json.loads((target / RECORD).read_text())
        return {**record, "path": str(target), "downloaded": False}
    root.mkdir(parents=True, exist_ok=True)
    if target.exists():  # incomplete or damaged: set it aside, fetch again
        aside = Path(tempfile.mkdtemp(prefix=f".damaged-{target.name}-", dir=root))
        os.replace(target, aside / "model")
        shutil.rmtree(aside, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=f".staging-{target.name}-", dir=root))
    try:
        (download_s3 if is_s3(name) else download_hub)(listing, staging)
        for rel, size in listing.files.items():
            got = (staging / rel).stat().st_size if (staging / rel).is_file() else None
            if got != size:
                raise UserError(f"{name}: {rel} arrived with {got} bytes, the listing says {size}")
        record = {
            "source": name,
            "revision": listing.revision,
            "commit": listing.commit,
            "files": listing.files,
        }
        (staging / RECORD).write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
        staging.chmod(0o755)  # mkdtemp's 0700 would hide it from pods running as another user
        try:
            os.rename(staging, target)
        except OSError:  # another run renamed its complete copy first
            if not complete(target):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {**record, "path": str(target), "downloaded": True}


def fetch_summary(cfg: RunConfig, record: dict | None) -> str:
    """What a fetch did, in a line or two (the CLI's and the KFP task's log)."""
    if record is None:
        return f"{cfg.model.name_or_path}: nothing to fetch (a tiny model or a local folder)"
    how = "downloaded" if record["downloaded"] else "already fetched (sizes checked)"
    size = sum(record["files"].values())
    return (
        f"{record['source']} at {record['commit']}: {len(record['files'])} files, "
        f"{size / 1e9:.2f} GB, {how}\nfolder: {record['path']}"
    )


def fetched_config(cfg: RunConfig, workspace: str | Path):
    """The recipe with `model.local_dir` and `model.commit` set to the fetched copy (the
    recipe unchanged when nothing needs fetching), and the fetch record."""
    record = fetch(cfg.model, workspace)
    if record is None:
        return cfg, None
    model = cfg.model.model_copy(update={"local_dir": record["path"], "commit": record["commit"]})
    return cfg.model_copy(update={"model": model}), record
