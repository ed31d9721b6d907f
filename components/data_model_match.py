"""Data and model belong together: a prepared dataset trains and evaluates only the model whose
tokenizer made it.

`prepare` records the tokenizer's fingerprint (its serialized vocabulary, merges, normalizer and
pre-tokenizer, and its special tokens) and vocabulary size in stats.json. `train` and `evaluate`
check, before any process group starts, that the recipe's model has the same tokenizer and that
no token id in the dataset lies outside the model's embedding: a mismatch is one line naming
both models (exit 2), never garbage training or a device-side assert on a GPU.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .artifacts import STATS_FILE
from .errors import UserError


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of what decides the token ids: the tokenizer's serialization and special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        body = json.loads(backend.to_str())
        body.pop("padding", None)  # padding/truncation settings do not change any id
        body.pop("truncation", None)
    else:
        body = sorted(tokenizer.get_vocab().items())
    special = {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())}
    text = json.dumps({"tokenizer": body, "special": special}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def tokenizer_record(tokenizer, model: str) -> dict:
    """What prepare writes to stats.json under `tokenizer`."""
    return {
        "model": model,
        "fingerprint": tokenizer_fingerprint(tokenizer),
        "vocab_size": len(tokenizer),
    }


def max_token_id(dataset_dir: Path) -> int:
    """The largest input id over every split (Arrow compute on the memory-mapped tables)."""
    import pyarrow.compute as pc
    from datasets import load_from_disk

    data = load_from_disk(str(dataset_dir))
    largest = -1
    for split in data.values():
        if len(split):
            column = split.data.table.column("input_ids")
            largest = max(largest, pc.max(pc.list_flatten(column)).as_py())
    return largest


def check_data_matches_model(model_cfg, dataset_dir: str | Path) -> None:
    """Refuse a dataset prepared for another tokenizer or holding ids the model lacks."""
    from .models import load_config, load_tokenizer

    dataset = Path(dataset_dir)
    stats = json.loads((dataset / STATS_FILE).read_text())
    name = model_cfg.name_or_path
    made = stats.get("tokenizer")
    if made is not None and made["fingerprint"] != tokenizer_fingerprint(load_tokenizer(model_cfg)):
        raise UserError(
            f"{dataset}: prepared with the tokenizer of {made['model']}, which is not the "
            f"tokenizer of model.name_or_path {name}; run `kubetune prepare` with this model"
        )
    embeddings = getattr(load_config(model_cfg), "vocab_size", None)
    largest = max_token_id(dataset)
    if embeddings is not None and largest >= embeddings:
        source = made["model"] if made else stats.get("model", "another model")
        raise UserError(
            f"{dataset}: holds token id {largest}, but model.name_or_path {name} has "
            f"{embeddings} embeddings (the data was prepared for {source})"
        )
