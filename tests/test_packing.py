"""best_fit_decreasing and pack_sequences, checked against brute force on small cases."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest

from kubetune.components.prepare_dataset.packing import best_fit_decreasing
from kubetune.components.prepare_dataset.ragged import Rows, assemble, pack


def optimal_bins(lengths, capacity):
    """Fewest bins, by trying every assignment (only for a handful of items)."""
    best = len(lengths)
    for assignment in itertools.product(range(len(lengths)), repeat=len(lengths)):
        loads = [0] * len(lengths)
        for item, b in zip(lengths, assignment, strict=True):
            loads[b] += item
        if max(loads) <= capacity:
            best = min(best, sum(1 for load in loads if load))
    return best


@pytest.mark.parametrize("seed", range(20))
def test_bfd_is_valid_and_near_optimal(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(1, 10) for _ in range(6)]
    bins = best_fit_decreasing(lengths, 10)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 10 for b in bins)
    # BFD's bound: at most 11/9 OPT + 6/9 bins.
    assert len(bins) <= 11 / 9 * optimal_bins(lengths, 10) + 6 / 9


def reference_bfd(lengths, capacity):
    """Textbook best-fit decreasing over a sorted list of open rooms (the first version)."""
    import bisect

    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins, room, room_bin = [], [], []
    for index in order:
        length = lengths[index]
        pos = bisect.bisect_left(room, length)
        if pos < len(room):
            left, target = room.pop(pos) - length, room_bin.pop(pos)
            bins[target].append(index)
        else:
            target, left = len(bins), capacity - length
            bins.append([index])
        if left > 0:
            at = bisect.bisect_left(room, left)
            room.insert(at, left)
            room_bin.insert(at, target)
    return bins


@pytest.mark.parametrize("n,capacity", [(1, 8), (500, 16), (3000, 512), (2000, 4096)])
def test_bfd_matches_the_textbook_version(n, capacity):
    rng = random.Random(n)
    lengths = [rng.randint(1, capacity) for _ in range(n)]
    assert best_fit_decreasing(lengths, capacity) == reference_bfd(lengths, capacity)


def test_bfd_refuses_an_example_over_capacity():
    with pytest.raises(ValueError, match="example 1 has 11 tokens > capacity 10"):
        best_fit_decreasing([3, 11, 2], 10)


def test_bfd_picks_the_tightest_bin():
    # 7 opens a bin (room 3), 6 opens a bin (room 4); 3 must go with 7 (room 3), not with 6.
    assert best_fit_decreasing([7, 6, 3, 4], 10) == [[0, 2], [1, 3]]


def rows_of(ids, labels):
    lengths = [len(r) for r in ids]
    return Rows(
        np.array(sum(ids, []), np.int32),
        np.array(sum(labels, []), np.int32),
        np.concatenate([[0], np.cumsum(lengths)]),
    )


def test_pack_resets_positions_and_masks_boundaries():
    ids = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
    labels = [[-100, 2, 3], [4, 5], [-100, -100, 8, 9]]
    bins = best_fit_decreasing([3, 2, 4], 5)
    packed, positions = pack(rows_of(ids, labels), bins)
    rows = [packed.ids[a:b].tolist() for a, b in itertools.pairwise(packed.offsets)]
    assert sorted(map(tuple, rows)) == [(1, 2, 3, 4, 5), (6, 7, 8, 9)]
    start = packed.offsets[rows.index([1, 2, 3, 4, 5])]
    assert positions[start : start + 5].tolist() == [0, 1, 2, 0, 1]
    # the second example's first label is masked: its token is never predicted across the seam
    assert packed.labels[start : start + 5].tolist() == [-100, 2, 3, -100, 5]


def test_assemble_masks_prompts_and_adds_prefix_and_eos():
    pieces = [[10, 11], [20], [30], [40, 41], [50]]
    rows = assemble(pieces, [False, True, False, True, True], [2, 3], prefix=[1], eos=2)
    assert rows.ids.tolist() == [1, 10, 11, 20, 2, 1, 30, 40, 41, 50, 2]
    assert rows.labels.tolist() == [-100, -100, -100, 20, 2, -100, -100, 40, 41, 50, 2]
    assert rows.offsets.tolist() == [0, 5, 11]
    no_prefix = assemble(pieces[:2], [False, True], [2], prefix=[], eos=2)
    assert no_prefix.ids.tolist() == [10, 11, 20, 2]


def test_too_long_example_is_a_bug():
    with pytest.raises(ValueError):
        best_fit_decreasing([11], 10)
