"""Resolve `model.name_or_path` (hub id, local dir, `s3://`, `tiny://ARCH`) and load from it.

Every kind ends in the same `from_pretrained` call: tiny models and S3 copies are folders on
disk by the time transformers sees them. Weights are safetensors only; `trust_remote_code`
is whatever the recipe says (False by default).
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import UserError
from .model_files import check_model_folder
from .storage import is_s3, s3_cached
from .tiny_models import cache_root, is_tiny, tiny_model_dir


def resolve_model(name_or_path: str) -> str:
    """A local folder for tiny/S3/local models, or the hub id unchanged."""
    if is_tiny(name_or_path):
        return str(tiny_model_dir(name_or_path))
    if is_s3(name_or_path):
        local = s3_cached(name_or_path, cache_root() / "s3")
        check_model_folder(local)
        return str(local)
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise UserError(f"model.name_or_path: {path} has no config.json")
        check_model_folder(path)
        return str(path)
    if name_or_path.startswith((".", "/", "~")):
        raise UserError(f"model.name_or_path: {name_or_path} does not exist")
    return name_or_path


def model_source(model_cfg) -> str:
    """Where the recipe's model loads from: its fetched copy (`model.local_dir`) when it has
    one, else what `resolve_model` makes of `model.name_or_path`."""
    if model_cfg.local_dir:
        folder = Path(model_cfg.local_dir)
        if not (folder / "config.json").is_file():
            raise UserError(
                f"model.local_dir: {folder} is not a fetched model (no config.json); run the "
                "fetch step again"
            )
        check_model_folder(folder)
        return str(folder)
    return resolve_model(model_cfg.name_or_path)


def model_revision(model_cfg) -> str | None:
    """The hub revision to ask transformers for (none for a fetched copy: it is a folder)."""
    return None if model_cfg.local_dir else model_cfg.revision


def load_config(model_cfg):
    """The model's transformers config (config.json only: no weights are read)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(
        model_source(model_cfg),
        revision=model_revision(model_cfg),
        trust_remote_code=model_cfg.trust_remote_code,
    )


def load_tokenizer(model_cfg):
    """The model's tokenizer, with a pad token (EOS when the model has none)."""
    from transformers import AutoTokenizer

    source = model_source(model_cfg)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source,
            revision=model_revision(model_cfg),
            trust_remote_code=model_cfg.trust_remote_code,
        )
    except (OSError, ValueError) as exc:
        raise UserError(
            f"model.name_or_path: cannot load the tokenizer of {model_cfg.name_or_path!r}: "
            f"{str(exc).splitlines()[0]}"
        ) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_prepare_tokenizer(model_cfg):
    """The tokenizer prepare uses: fast_tokenizer.FastTokenizer (no transformers, no torch) for
    a local model whose tokenizer transformers loads as a plain fast tokenizer, else
    load_tokenizer's. Both give the same ids, special tokens and fingerprint."""
    from .fast_tokenizer import FastTokenizer

    source = Path(model_source(model_cfg))
    if source.is_dir() and not model_cfg.trust_remote_code:
        light = FastTokenizer.load(source)
        if light is not None:
            return light
    return load_tokenizer(model_cfg)


def safetensors_files(source: str, revision: str | None) -> list[Path]:
    """The checkpoint's safetensors shards (downloading a hub model's, never pickle files)."""
    folder = Path(source)
    if not folder.is_dir():
        from huggingface_hub import snapshot_download

        try:
            folder = Path(
                snapshot_download(
                    source, revision=revision, allow_patterns=["*.safetensors", "*.json"]
                )
            )
        except Exception as exc:  # offline, gated, missing: the user's to fix
            raise UserError(f"model.name_or_path: cannot download {source!r}: {exc}") from None
        check_model_folder(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / s for s in shards]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise UserError(
            f"model.name_or_path: {source} has no safetensors weights (pickle "
            "checkpoints are not loaded)"
        )
    return files
