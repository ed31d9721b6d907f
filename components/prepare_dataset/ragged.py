"""Token rows as flat numpy arrays plus offsets, so that masking, truncation, splitting and
packing are a few vectorised gathers instead of Python list work per token."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain

import numpy as np

from ..artifacts import IGNORE_INDEX


def gather(flat: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenate flat[starts[i] : starts[i] + lengths[i]] for every i."""
    lengths = lengths.astype(np.int64)
    total = int(lengths.sum())
    out_starts = np.cumsum(lengths) - lengths
    index = np.repeat(starts.astype(np.int64) - out_starts, lengths) + np.arange(
        total, dtype=np.int64
    )
    return flat[index]


def offsets_of(lengths: np.ndarray) -> np.ndarray:
    offsets: np.ndarray = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return offsets


@dataclass
class Rows:
    """Rows of token ids and labels: row i is ids[offsets[i]:offsets[i + 1]]."""

    ids: np.ndarray
    labels: np.ndarray
    offsets: np.ndarray

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def take(self, rows: np.ndarray, lengths: np.ndarray | None = None) -> Rows:
        """The given rows, in that order, each cut to `lengths` (default: whole)."""
        rows = np.asarray(rows, dtype=np.int64)
        lengths = self.lengths[rows] if lengths is None else lengths
        starts = self.offsets[:-1][rows]
        return Rows(
            gather(self.ids, starts, lengths),
            gather(self.labels, starts, lengths),
            offsets_of(lengths),
        )

    def position_ids(self) -> np.ndarray:
        return np.arange(len(self.ids), dtype=np.int64) - np.repeat(self.offsets[:-1], self.lengths)

    def trainable_per_row(self, lengths: np.ndarray | None = None) -> np.ndarray:
        """Label tokens (not -100) in each row, or in each row's first `lengths` tokens."""
        trained = np.concatenate([[0], np.cumsum(self.labels != IGNORE_INDEX)])
        ends = self.offsets[1:] if lengths is None else self.offsets[:-1] + lengths
        return trained[ends] - trained[self.offsets[:-1]]


def flatten(pieces: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Token lists as one flat int32 array and their lengths."""
    seg_len = np.fromiter(map(len, pieces), dtype=np.int64, count=len(pieces))
    seg_flat = np.fromiter(chain.from_iterable(pieces), dtype=np.int32, count=int(seg_len.sum()))
    return seg_flat, seg_len


def assemble(
    pieces: list[list[int]],
    trainable: list[bool],
    pieces_per_row: list[int],
    prefix: list[int],
    eos: int,
) -> Rows:
    """Rows of `prefix + piece... + [eos]`; labels copy trainable pieces and EOS, else -100.

    `pieces` are the tokenized segments of all rows in order; row r owns the next
    `pieces_per_row[r]` of them.
    """
    return assemble_flat(*flatten(pieces), trainable, pieces_per_row, prefix, eos)


def assemble_flat(
    seg_flat: np.ndarray,
    seg_len: np.ndarray,
    trainable: list[bool],
    pieces_per_row: list[int],
    prefix: list[int],
    eos: int,
) -> Rows:
    """`assemble` for segments already flat: seg_flat holds segment i's tokens at
    offsets_of(seg_len)[i]."""
    seg_start = offsets_of(seg_len)[:-1]
    # Append the prefix and EOS once to the flat array; every row points at them.
    prefix_at, eos_at = len(seg_flat), len(seg_flat) + len(prefix)
    flat = np.concatenate([seg_flat, np.asarray(prefix + [eos], dtype=np.int32)])

    counts = np.asarray(pieces_per_row, dtype=np.int64)
    n_rows, n_prefix = len(counts), 1 if prefix else 0
    per_row = counts + n_prefix + 1
    row_first = offsets_of(per_row)[:-1]  # index of each row's first piece in the piece list
    n_pieces = int(per_row.sum())
    starts: np.ndarray = np.empty(n_pieces, dtype=np.int64)
    lengths: np.ndarray = np.empty(n_pieces, dtype=np.int64)
    train: np.ndarray = np.empty(n_pieces, dtype=bool)
    if n_prefix:
        starts[row_first], lengths[row_first], train[row_first] = prefix_at, len(prefix), False
    last = row_first + per_row - 1
    starts[last], lengths[last], train[last] = eos_at, 1, True
    # The segments fill the slots between prefix and EOS, in order.
    is_segment: np.ndarray = np.ones(n_pieces, dtype=bool)
    is_segment[last] = False
    if n_prefix:
        is_segment[row_first] = False
    starts[is_segment], lengths[is_segment] = seg_start, seg_len
    train[is_segment] = np.asarray(trainable, dtype=bool)

    ids = gather(flat, starts, lengths)
    labels = np.where(np.repeat(train, lengths), ids, IGNORE_INDEX).astype(np.int32)
    row_len = np.add.reduceat(lengths, row_first) if n_rows else np.zeros(0, dtype=np.int64)
    return Rows(ids, labels, offsets_of(row_len))


def pack(rows: Rows, bins: list[list[int]]) -> tuple[Rows, np.ndarray]:
    """Concatenate the rows of each bin into one row; returns the rows and their position ids.

    Position ids restart at 0 for each example, and each example's first label is -100, so no
    loss crosses an example boundary.
    """
    order = np.fromiter(chain.from_iterable(bins), dtype=np.int64, count=sum(map(len, bins)))
    return pack_ordered(rows.take(order), np.fromiter(map(len, bins), np.int64, len(bins)))


def pack_ordered(examples: Rows, bin_sizes: np.ndarray) -> tuple[Rows, np.ndarray]:
    """`pack` for examples already in bin order: bin i is the next `bin_sizes[i]` of them."""
    positions = examples.position_ids()
    labels = examples.labels.copy()
    labels[examples.offsets[:-1]] = IGNORE_INDEX
    bin_len = np.add.reduceat(examples.lengths, offsets_of(bin_sizes)[:-1])
    return Rows(examples.ids, labels, offsets_of(bin_len)), positions
