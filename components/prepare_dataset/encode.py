"""Records → token rows, a batch at a time, in this process or in `data.num_proc` workers.

A batch of records is rendered (prompt / response segments), tokenized, masked, given EOS and
cut by the length policy, all row by row, so the result does not depend on where the batches
are cut or which process encodes them: every `num_proc` gives the same rows in the same order.

The main process reads and parses the records (so file:line errors come in file order) and
hands batches to the workers; results come back in the order the batches were read. A bad row
under `data.on_bad_row=error` is returned as the batch's error and raised by the main process
when it reaches that batch, after every earlier batch, as if everything ran in one loop.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..artifacts import IGNORE_INDEX
from ..errors import UserError
from .formats import RowError, formatter
from .ragged import Rows, assemble_flat, flatten
from .readers import LineBatch
from .spill import SpillBatch

# Records per batch: large enough for the Rust tokenizer's batched call, small enough that a
# batch's texts, Encodings and arrays stay a few MB.
BATCH_ROWS = 1000
# Batches in flight per worker: keeps every worker busy while the main process reads.
IN_FLIGHT_PER_WORKER = 2


@dataclass
class Encoded:
    """One batch's kept examples (after the length policy), ready for the spill, and what
    happened to the others."""

    spill: SpillBatch
    tokens: int  # in the kept examples
    response: int  # of them trained on
    read: int
    dropped: Counter = field(default_factory=Counter)
    truncated: int = 0
    error: str | None = None  # the first bad row, under data.on_bad_row=error


def special_prefix(tokenizer) -> list[int]:
    """Tokens the tokenizer puts before a text on its own (Llama's BOS; nothing for Falcon)."""
    ids = tokenizer("", add_special_tokens=True)["input_ids"]
    return [i for i in ids if i != tokenizer.eos_token_id]


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


class Encoder:
    """A batch of `(where, record)` → `Encoded`; picklable for spawned workers (the format's
    render function is rebuilt from the data config there)."""

    def __init__(self, data_cfg, tokenizer):
        self.data_cfg = data_cfg
        self.tokenizer = tokenizer
        self.chat = data_cfg.format == "chat"
        self.prefix = [] if self.chat else special_prefix(tokenizer)
        self.render, self.required = formatter(data_cfg, tokenizer)

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "render"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.render, _ = formatter(self.data_cfg, self.tokenizer)

    def usable(self, records: Iterable, dropped: Counter, convert) -> tuple[list, int, str | None]:
        """`convert(row)` of every usable record, how many records were read, and the first bad
        row's (or unreadable line's) error if any. `convert` raises RowError for a bad row and
        returns None for one that holds nothing to learn (counted as empty_response)."""
        cfg = self.data_cfg
        examples: list = []
        read = 0
        rows = iter(records)
        while True:
            try:
                where, row = next(rows)
            except StopIteration:
                break
            except UserError as exc:  # a LineBatch's line that is not a JSON object
                return examples, read, str(exc)
            read += 1
            try:
                example = convert(row)
            except RowError as exc:
                if cfg.on_bad_row == "error":
                    return (
                        examples,
                        read,
                        (
                            f"{where}: {exc} (data.format={cfg.format}; set "
                            "data.on_bad_row=drop to skip such rows)"
                        ),
                    )
                dropped[exc.reason] += 1
                continue
            if example is None:
                dropped["empty_response"] += 1
                continue
            examples.append(example)
        return examples, read, None

    def segments(self, records: Iterable, dropped: Counter) -> tuple[list, int, str | None]:
        """Rendered segments of the usable records (`usable`)."""

        def convert(row: dict):
            segments = self.render(row)
            return segments if any(t.strip() for t, trained in segments if trained) else None

        return self.usable(records, dropped, convert)

    def tokenize(self, examples: list) -> Rows:
        """Every segment through the Rust tokenizer's batched call, straight into int32 arrays;
        labels mask the prompt."""
        backend = self.tokenizer.backend_tokenizer
        encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
        texts = [text for segments in examples for text, _ in segments]
        flat, lengths = flatten([e.ids for e in encode(texts, add_special_tokens=False)])
        return assemble_flat(
            flat,
            lengths,
            [t for segments in examples for _, t in segments],
            [len(s) for s in examples],
            self.prefix,
            self.tokenizer.eos_token_id,
        )

    def __call__(self, batch: list | LineBatch) -> Encoded:
        dropped: Counter = Counter()
        records = batch.records() if isinstance(batch, LineBatch) else batch
        examples, read, error = self.segments(records, dropped)
        rows = self.tokenize(examples)
        cfg = self.data_cfg
        rows, kept, truncated = apply_length_policy(rows, cfg.max_seq_len, cfg.overlength, dropped)
        kept_examples = [examples[i] for i in kept]
        return Encoded(
            SpillBatch.of(
                rows,
                ["".join(t for t, trained in s if not trained) for s in kept_examples],
                ["".join(t for t, trained in s if trained) for s in kept_examples],
            ),
            len(rows.ids),
            int((rows.labels != IGNORE_INDEX).sum()),
            read,
            dropped,
            truncated,
            error,
        )


def _cgroup_quota() -> float | None:
    """The CPU quota of this process's cgroup (v2 `cpu.max`, or v1 `cfs_quota_us`), if any."""
    for quota_file, period_file in (
        ("/sys/fs/cgroup/cpu.max", None),
        ("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", "/sys/fs/cgroup/cpu/cpu.cfs_period_us"),
    ):
        try:
            fields = Path(quota_file).read_text().split()
            if period_file:
                fields.append(Path(period_file).read_text().strip())
            if fields[0] not in ("max", "-1"):
                return int(fields[0]) / int(fields[1])
        except (OSError, ValueError, IndexError):
            continue
    return None


def available_cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by its cgroup's CPU quota (a pod's
    `resources.limits.cpu`)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    quota = _cgroup_quota()
    if quota is not None:
        cpus = min(cpus or 1, max(1, int(quota)))
    return max(1, cpus or 1)


def record_batches(records: Iterable, size: int) -> Iterator[list | LineBatch]:
    """Records in lists of `size` (a LineBatch is a batch of its own); a reader's error comes
    after the rows read before it."""
    batch: list = []
    try:
        for record in records:
            if isinstance(record, LineBatch):
                if batch:
                    yield batch
                    batch = []
                yield record
                continue
            batch.append(record)
            if len(batch) == size:
                yield batch
                batch = []
    except UserError:
        if batch:
            yield batch
        raise
    if batch:
        yield batch


_WORKER_ENCODER: Encoder | None = None


def _start_worker(encoder: Encoder) -> None:
    global _WORKER_ENCODER
    # One tokenizer thread per worker: the workers are the parallelism.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER_ENCODER = encoder


def _encode_in_worker(records: list | LineBatch) -> Encoded:
    assert _WORKER_ENCODER is not None, "the pool initializer sets it"
    return _WORKER_ENCODER(records)


def _context():
    # fork shares the loaded tokenizer with no pickling; spawn where fork does not exist
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")


def encode_all(records: Iterable, encoder: Encoder, num_proc: int) -> Iterator[Encoded]:
    """`encoder` over every batch of `records`, in order. With num_proc > 1 the batches go to
    that many worker processes, started once a second batch shows the data needs them; with 1
    (or one batch of data) they are encoded here, the tokenizer using its own threads."""
    batches = record_batches(records, BATCH_ROWS)
    head: list = []
    reader_error: UserError | None = None
    try:
        for batch in batches:
            head.append(batch)
            if len(head) == 2 or num_proc <= 1:
                break
    except UserError as exc:
        reader_error = exc
    if num_proc <= 1 or len(head) < 2:
        for batch in head:
            yield encoder(batch)
        if reader_error:
            raise reader_error
        for batch in batches:
            yield encoder(batch)
        return

    pool = _context().Pool(num_proc, initializer=_start_worker, initargs=(encoder,))
    try:
        pending: deque = deque(pool.apply_async(_encode_in_worker, (b,)) for b in head)
        while reader_error is None:
            try:
                batch = next(batches)
            except StopIteration:
                break
            except UserError as exc:
                reader_error = exc  # raised after the batches read before it
                break
            pending.append(pool.apply_async(_encode_in_worker, (batch,)))
            while len(pending) > IN_FLIGHT_PER_WORKER * num_proc:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
    finally:
        pool.terminate()
        pool.join()
    if reader_error:
        raise reader_error
