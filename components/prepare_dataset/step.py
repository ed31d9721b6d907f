"""prepare_dataset: instruction records → tokenized, masked, optionally packed train/eval splits.

    read → format (prompt / response segments) → tokenize → mask prompt, add EOS → length
    policy (a batch at a time, in `data.num_proc` processes) → rows spilled to disk → split →
    pack train (lengths only) → write Arrow shards a chunk at a time + stats.json, atomically

Memory does not grow with the data: records, texts and token ids live for one batch; what
stays in memory for the whole dataset is each example's length and offsets (about 40 bytes per
row). The output is in `DatasetDict.save_to_disk`'s layout (same shards, record batches,
state.json and dataset_info.json; see arrow_out.py), byte-identical for every `num_proc`.

Length policy (`data.overlength`): `truncate` keeps the first `max_seq_len` tokens, so a long
prompt keeps its start and the response loses its tail (and EOS); a row left without any
response token is dropped (`no_response_after_truncation`). `drop` removes every row longer
than `max_seq_len` (`too_long`). The eval split is never packed and keeps each row's prompt and
reference text for generation.

Prompt and response are tokenized separately, so the prompt tokens a model trains on are
exactly the tokens it will see when the prompt alone is given at inference.
"""

from __future__ import annotations

import itertools
import json
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..artifacts import DATASET_DICT_FILE, STATS_FILE, write_json
from ..config import RunConfig, write_resolved
from ..console import Progress
from ..data_model_match import tokenizer_record
from ..errors import UserError
from ..models import load_prepare_tokenizer
from ..outputs import check_output, staged_output
from .arrow_out import OrderedDigest, SplitWriter, chunk_table, table_nbytes
from .encode import Encoder, available_cpus, encode_all
from .packing import pack_order
from .preference import PreferenceEncoder, documents, pair_lengths
from .ragged import offsets_of, pack_ordered
from .readers import read_records
from .spill import Spill


def spill_examples(cfg: RunConfig, tokenizer, spill: Spill, progress: Progress) -> dict:
    """Read, encode and spill every usable record; returns the counts stats.json reports."""
    preference = cfg.data.format == "preference"
    encoder = PreferenceEncoder(cfg.data, tokenizer) if preference else Encoder(cfg.data, tokenizer)
    # JSON Lines: the workers parse the lines (unless max_rows counts them here)
    whole_lines = not cfg.data.max_rows
    records = read_records(cfg.data.path, encoder.required, cfg.data.split, whole_lines)
    if cfg.data.max_rows:
        records = itertools.islice(records, cfg.data.max_rows)
    num_proc = cfg.data.num_proc or available_cpus()
    counts = {"read": 0, "truncated": 0, "response": 0}
    dropped: Counter = Counter()
    tokens = 0
    for batch in encode_all(records, encoder, num_proc):
        if batch.error:
            raise UserError(batch.error)
        spill.add(batch.spill)
        counts["read"] += batch.read
        counts["truncated"] += batch.truncated
        counts["response"] += batch.response
        dropped.update(batch.dropped)
        tokens += batch.tokens
        progress.update(counts["read"], tokens)
    spill.close()
    if counts["read"] == 0:
        raise UserError(f"{cfg.data.path}: no rows to read")
    progress.done(counts["read"], tokens)
    return {**counts, "dropped": dropped}


def split_indices(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.Generator(np.random.PCG64(seed)).permutation(n)
    n_eval = int(round(n * fraction))
    if fraction > 0 and n >= 2:
        n_eval = min(max(n_eval, 1), n - 1)
    return np.sort(order[n_eval:]), np.sort(order[:n_eval])


# the eval split's text columns: their spill names
EVAL_TEXTS = {"prompt": "prompt", "reference": "ref"}


def write_split(
    folder: Path,
    spill: Spill,
    flat: np.ndarray,
    sizes: np.ndarray,
    digest: OrderedDigest,
    texts,
    pairs: bool = False,
) -> str:
    """A split whose row i packs the next `sizes[i]` examples of `flat` (all 1 when unpacked);
    returns its fingerprint (the digest over every split so far). `pairs` (preference data):
    an eval row is one pair, its texts the chosen document's prompt and answer."""
    texted = flat[0::2] if pairs else flat  # an eval row's texts: its first example's
    text_bytes = [spill.text_bytes(n, texted) for n in EVAL_TEXTS.values()] if texts else []
    writer = SplitWriter(
        folder,
        len(sizes),
        table_nbytes(len(sizes), int(spill.lengths[flat].sum()), text_bytes),
        tuple(EVAL_TEXTS) if texts else (),
    )
    starts = offsets_of(sizes)

    def table(first: int, end: int):
        examples = flat[starts[first] : starts[end]]
        rows = spill.rows(examples)
        if texts and not pairs:  # eval: one example per row, never packed
            positions = rows.position_ids()
        else:  # packed rows, or eval's one pair per row
            rows, positions = pack_ordered(rows, sizes[first:end])
        columns = {}
        if texts:  # the prompt and reference of each row's first (a pair's chosen) example
            firsts = examples[0::2] if pairs else examples
            columns = {col: spill.texts(name, firsts) for col, name in EVAL_TEXTS.items()}
        digest.add(rows)
        return chunk_table(rows, positions, columns)

    writer.write(table)
    fingerprint = digest.end_split(
        [folder / writer.filename(shard) for shard in range(writer.num_shards)]
    )
    writer.finish(fingerprint[:16])
    return fingerprint


def _length_stats(lengths: np.ndarray) -> dict:
    return {
        "min": int(lengths.min()),
        "mean": round(float(lengths.mean()), 2),
        "max": int(lengths.max()),
    }


@dataclass
class Layout:
    """The splits' rows: train row i packs the next `train_sizes[i]` documents of
    `train_flat`; eval row j the next `eval_sizes[j]` of `eval_docs`."""

    train_flat: np.ndarray
    train_sizes: np.ndarray
    eval_docs: np.ndarray
    eval_sizes: np.ndarray
    train_tokens: int
    eval_tokens: int
    units: int  # examples, or pairs
    train_units: int
    capacity: int  # tokens a row may hold
    pairs: bool


def layout(cfg: RunConfig, lengths: np.ndarray) -> Layout:
    """Split and pack the units: examples, or pairs of documents (preference data: a pair is
    never split, and a row holds up to 2 x max_seq_len tokens)."""
    pairs = cfg.data.format == "preference"
    units = pair_lengths(lengths) if pairs else lengths
    per_unit = 2 if pairs else 1
    capacity = cfg.data.max_seq_len * per_unit
    train_idx, eval_idx = split_indices(len(units), cfg.data.eval_fraction, cfg.data.seed)
    train_flat = train_idx
    train_sizes: np.ndarray = np.ones(len(train_idx), dtype=np.int64)
    if cfg.data.packing:
        order, train_sizes = pack_order(units[train_idx], capacity)
        train_flat = train_idx[order]
    eval_sizes: np.ndarray = np.full(len(eval_idx), per_unit, np.int64)
    train_tokens, eval_tokens = int(units[train_idx].sum()), int(units[eval_idx].sum())
    if pairs:  # pairs -> their documents
        train_flat, eval_idx = documents(train_flat), documents(eval_idx)
        train_sizes = train_sizes * 2
    return Layout(
        train_flat, train_sizes, eval_idx, eval_sizes, train_tokens, eval_tokens, len(units),
        len(train_idx), capacity, pairs,
    )  # fmt: skip


def prepare(cfg: RunConfig, output_dir: str | Path, overwrite: bool = False) -> dict:
    """Run the step; returns the stats also written to `output_dir/stats.json`."""
    output = Path(output_dir)
    check_output(output, overwrite)
    tokenizer = load_prepare_tokenizer(cfg.model)
    with staged_output(output, overwrite) as staging:
        work = staging / ".work"  # spilled rows; removed before the folder is published
        spill = Spill(work / "spill")
        counts = spill_examples(cfg, tokenizer, spill, Progress("prepare"))
        lengths, dropped = spill.lengths, counts["dropped"]
        if not len(lengths):
            reasons = ", ".join(f"{k}: {v}" for k, v in dropped.items())
            raise UserError(
                f"{cfg.data.path}: no usable rows left out of {counts['read']} ({reasons})"
            )

        lay = layout(cfg, lengths)
        train_flat, train_sizes, eval_idx, eval_sizes = (
            lay.train_flat,
            lay.train_sizes,
            lay.eval_docs,
            lay.eval_sizes,
        )
        preference, n_train = lay.pairs, len(train_sizes)

        digest = OrderedDigest()
        # datasets cannot load back an empty split it saved: no eval split when there is none
        splits = ["train", "eval"] if len(eval_idx) else ["train"]
        (staging / DATASET_DICT_FILE).write_text(json.dumps({"splits": splits}))
        fingerprint = write_split(staging / "train", spill, train_flat, train_sizes, digest, False)
        if len(eval_idx):
            fingerprint = write_split(
                staging / "eval", spill, eval_idx, eval_sizes, digest, True, preference
            )
        del spill
        shutil.rmtree(work)

        stats = {
            "source": cfg.data.path,
            "format": cfg.data.format,
            "model": cfg.model.name_or_path,
            "max_seq_len": cfg.data.max_seq_len,
            "rows_read": counts["read"],
            "rows_kept": lay.units,
            "rows_dropped": dict(sorted(dropped.items())),
            "rows_dropped_total": sum(dropped.values()),
            "truncated_rows": counts["truncated"],
            "overlength_policy": cfg.data.overlength,
            "tokens": {
                "total": int(lengths.sum()),
                "train": lay.train_tokens,
                "eval": lay.eval_tokens,
                "response": counts["response"],
            },
            "splits": {"train": n_train, "eval": len(eval_sizes)},
            "examples": {"train": lay.train_units, "eval": len(eval_sizes)},
            "example_length": _length_stats(lengths),
            "packing": {
                "enabled": cfg.data.packing,
                "rows": n_train,
                "efficiency": round(lay.train_tokens / (n_train * lay.capacity), 4)
                if n_train
                else 0.0,
            },
            **(
                {"pairs": {"train": lay.train_units, "eval": len(eval_sizes)}} if preference else {}
            ),
            "fingerprint": fingerprint,
            "tokenizer": tokenizer_record(tokenizer, cfg.model.name_or_path),
        }
        write_resolved(cfg, staging)
        # stats.json is written last: a folder with it is complete.
        write_json(staging / STATS_FILE, stats, indent=2)
    return stats
