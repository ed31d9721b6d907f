"""prepare_dataset: instruction records → tokenized, masked, optionally packed train/eval splits.

    read → format (prompt / response segments) → tokenize (one batched call) → mask prompt,
    add EOS → length policy → split → pack train → save_to_disk + stats.json, atomically

Length policy (`data.overlength`): `truncate` keeps the first `max_seq_len` tokens, so a long
prompt keeps its start and the response loses its tail (and EOS); a row left without any
response token is dropped (`no_response_after_truncation`). `drop` removes every row longer
than `max_seq_len` (`too_long`). The eval split is never packed and keeps each row's prompt and
reference text for generation.

Prompt and response are tokenized separately, so the prompt tokens a model trains on are
exactly the tokens it will see when the prompt alone is given at inference.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np

from ..config import RunConfig, write_resolved
from ..data_model_match import tokenizer_record
from ..errors import UserError
from ..models import load_tokenizer
from ..outputs import check_output, staged_output
from .formats import RowError, formatter
from .packing import best_fit_decreasing
from .ragged import IGNORE, Rows, assemble_flat, flatten, pack
from .readers import read_records


def collect_examples(cfg: RunConfig, tokenizer, dropped: Counter) -> tuple[list, int]:
    """Read and format every record; returns (segments per kept row, rows read)."""
    render, required = formatter(cfg.data, tokenizer)
    kept, read = [], 0
    for where, row in read_records(cfg.data.path, required, cfg.data.split):
        read += 1
        try:
            segments = render(row)
        except RowError as exc:
            if cfg.data.on_bad_row == "error":
                raise UserError(
                    f"{where}: {exc} (data.format={cfg.data.format}; set "
                    "data.on_bad_row=drop to skip such rows)"
                ) from None
            dropped[exc.reason] += 1
            continue
        if not any(text.strip() for text, trainable in segments if trainable):
            dropped["empty_response"] += 1
            continue
        kept.append(segments)
        if cfg.data.max_rows and read >= cfg.data.max_rows:
            break
    if read == 0:
        raise UserError(f"{cfg.data.path}: no rows to read")
    return kept, read


def special_prefix(tokenizer) -> list[int]:
    """Tokens the tokenizer puts before a text on its own (Llama's BOS; nothing for Falcon)."""
    ids = tokenizer("", add_special_tokens=True)["input_ids"]
    return [i for i in ids if i != tokenizer.eos_token_id]


# Segments per call of the Rust tokenizer: its Encoding objects (ids, offsets, token strings)
# for one chunk at a time, turned into a flat int32 array at once. One call for everything
# held every Encoding and a Python int per token: several GB at 200k samsum rows.
TOKENIZE_CHUNK = 16_384


def tokenize_examples(examples: list, tokenizer, chat: bool) -> Rows:
    """All segments through the Rust tokenizer's batched call (its own threads), a chunk at a
    time, into one flat int32 array; labels mask the prompt."""
    texts = [text for segments in examples for text, _ in segments]
    backend = tokenizer.backend_tokenizer
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    flats, lengths = [], []
    for start in range(0, len(texts), TOKENIZE_CHUNK):
        chunk = texts[start : start + TOKENIZE_CHUNK]
        flat, length = flatten([e.ids for e in encode(chunk, add_special_tokens=False)])
        flats.append(flat)
        lengths.append(length)
    del texts
    trainable = [t for segments in examples for _, t in segments]
    prefix = [] if chat else special_prefix(tokenizer)
    return assemble_flat(
        np.concatenate(flats) if flats else np.zeros(0, dtype=np.int32),
        np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int64),
        trainable,
        [len(s) for s in examples],
        prefix,
        tokenizer.eos_token_id,
    )


def apply_length_policy(rows: Rows, max_len: int, policy: str, dropped: Counter):
    """Rows within max_len, the indices of the examples kept, and how many were truncated."""
    lengths = rows.lengths
    too_long = lengths > max_len
    if not too_long.any():
        return rows, np.arange(len(rows)), 0
    if policy == "drop":
        keep, cut = ~too_long, lengths
        dropped["too_long"] += int(too_long.sum())
    else:
        cut = np.minimum(lengths, max_len)
        keep = rows.trainable_per_row(cut) > 0
        if lost := int((~keep).sum()):
            dropped["no_response_after_truncation"] += lost
    kept = np.flatnonzero(keep)
    return rows.take(kept, cut[kept]), kept, int((too_long & keep).sum())


def split_indices(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.Generator(np.random.PCG64(seed)).permutation(n)
    n_eval = int(round(n * fraction))
    if fraction > 0 and n >= 2:
        n_eval = min(max(n_eval, 1), n - 1)
    return np.sort(order[n_eval:]), np.sort(order[:n_eval])


def to_dataset(rows: Rows, positions: np.ndarray, texts: dict[str, list[str]], digest):
    """A datasets.Dataset with list<int32> columns built straight from the flat arrays."""
    import pyarrow as pa
    from datasets import Dataset

    offsets = pa.array(rows.offsets.astype(np.int32))
    columns = {
        "input_ids": pa.ListArray.from_arrays(offsets, pa.array(rows.ids.astype(np.int32))),
        "labels": pa.ListArray.from_arrays(offsets, pa.array(rows.labels.astype(np.int32))),
        "position_ids": pa.ListArray.from_arrays(offsets, pa.array(positions.astype(np.int32))),
    }
    columns.update({name: pa.array(values, type=pa.string()) for name, values in texts.items()})
    for array in (rows.ids, rows.labels, positions):
        digest.update(np.ascontiguousarray(array, dtype=np.int32).tobytes())
    # Our own digest is the fingerprint: datasets would otherwise hash the whole table.
    return Dataset(pa.table(columns), fingerprint=digest.copy().hexdigest()[:16])


def _length_stats(lengths: np.ndarray) -> dict:
    return {
        "min": int(lengths.min()),
        "mean": round(float(lengths.mean()), 2),
        "max": int(lengths.max()),
    }


def prepare_dataset(cfg: RunConfig, output_dir: str | Path, overwrite: bool = False) -> dict:
    """Run the step; returns the stats also written to `output_dir/stats.json`."""
    output = Path(output_dir)
    check_output(output, overwrite)
    tokenizer = load_tokenizer(cfg.model)
    dropped: Counter = Counter()
    examples, rows_read = collect_examples(cfg, tokenizer, dropped)
    rows = tokenize_examples(examples, tokenizer, chat=cfg.data.format == "chat")
    rows, kept, truncated = apply_length_policy(
        rows, cfg.data.max_seq_len, cfg.data.overlength, dropped
    )
    if not len(rows):
        reasons = ", ".join(f"{k}: {v}" for k, v in dropped.items())
        raise UserError(f"{cfg.data.path}: no usable rows left out of {rows_read} ({reasons})")

    train_idx, eval_idx = split_indices(len(rows), cfg.data.eval_fraction, cfg.data.seed)
    if cfg.data.packing:
        bins = best_fit_decreasing(rows.lengths[train_idx].tolist(), cfg.data.max_seq_len)
        train, positions = pack(rows, [train_idx[b].tolist() for b in bins])
    else:
        train = rows.take(train_idx)
        positions = train.position_ids()
    evals = rows.take(eval_idx)
    eval_texts = [examples[kept[i]] for i in eval_idx]

    digest = hashlib.sha256()
    train_ds = to_dataset(train, positions, {}, digest)
    eval_ds = to_dataset(
        evals,
        evals.position_ids(),
        {
            "prompt": ["".join(t for t, trained in s if not trained) for s in eval_texts],
            "reference": ["".join(t for t, trained in s if trained) for s in eval_texts],
        },
        digest,
    )

    stats = {
        "source": cfg.data.path,
        "format": cfg.data.format,
        "model": cfg.model.name_or_path,
        "max_seq_len": cfg.data.max_seq_len,
        "rows_read": rows_read,
        "rows_kept": len(rows),
        "rows_dropped": dict(sorted(dropped.items())),
        "rows_dropped_total": sum(dropped.values()),
        "truncated_rows": truncated,
        "overlength_policy": cfg.data.overlength,
        "tokens": {
            "total": int(rows.lengths.sum()),
            "train": len(train.ids),
            "eval": len(evals.ids),
            "response": int((rows.labels != IGNORE).sum()),
        },
        "splits": {"train": len(train), "eval": len(evals)},
        "examples": {"train": len(train_idx), "eval": len(eval_idx)},
        "example_length": _length_stats(rows.lengths),
        "packing": {
            "enabled": cfg.data.packing,
            "rows": len(train),
            "efficiency": round(len(train.ids) / (len(train) * cfg.data.max_seq_len), 4)
            if len(train)
            else 0.0,
        },
        "fingerprint": digest.hexdigest(),
        "tokenizer": tokenizer_record(tokenizer, cfg.model.name_or_path),
    }
    from datasets import DatasetDict

    with staged_output(output, overwrite) as staging:
        # datasets cannot load back an empty split it saved: no eval split when there is none
        splits = {"train": train_ds, "eval": eval_ds} if len(eval_ds) else {"train": train_ds}
        DatasetDict(splits).save_to_disk(str(staging))
        write_resolved(cfg, staging)
        # stats.json is written last: a folder with it is complete.
        (staging / "stats.json").write_text(json.dumps(stats, indent=2) + "\n", encoding="utf-8")
    return stats
