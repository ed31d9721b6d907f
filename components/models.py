"""Resolve `model.name_or_path` (hub id, local dir, `s3://`, `tiny://ARCH`) and load from it.

Every kind ends in the same `from_pretrained` call: tiny models and S3 copies are folders on
disk by the time transformers sees them. Weights are safetensors only; `trust_remote_code`
is whatever the recipe says (False by default).
"""

from __future__ import annotations

from pathlib import Path

from .errors import UserError
from .storage import is_s3, s3_cached
from .tiny_models import cache_root, is_tiny, tiny_model_dir


def resolve_model(name_or_path: str) -> str:
    """A local folder for tiny/S3/local models, or the hub id unchanged."""
    if is_tiny(name_or_path):
        return str(tiny_model_dir(name_or_path))
    if is_s3(name_or_path):
        return str(s3_cached(name_or_path, cache_root() / "s3"))
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise UserError(f"model.name_or_path: {path} has no config.json")
        return str(path)
    if name_or_path.startswith((".", "/", "~")):
        raise UserError(f"model.name_or_path: {name_or_path} does not exist")
    return name_or_path


def load_config(model_cfg):
    """The model's transformers config (config.json only: no weights are read)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(
        resolve_model(model_cfg.name_or_path),
        revision=model_cfg.revision,
        trust_remote_code=model_cfg.trust_remote_code,
    )


def load_tokenizer(model_cfg):
    """The model's tokenizer, with a pad token (EOS when the model has none)."""
    from transformers import AutoTokenizer

    source = resolve_model(model_cfg.name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source,
            revision=model_cfg.revision,
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
