"""Best-fit-decreasing packing of tokenized examples into rows of at most `capacity` tokens."""

from __future__ import annotations

import numpy as np


def pack_order(lengths: np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """Best-fit decreasing as flat arrays: (example indices bin after bin, examples per bin).

    Examples are placed longest first (ties by index), each into the open bin it fills most
    tightly (the bin with the least room that still fits it; among bins with equal room, the one
    that got that room last), or a new bin. Open bins wait in one stack per room value; a bit
    set of the room values that have any, shifted by the example's length, finds the tightest
    in one big-integer operation. Memory is a few arrays of the number of examples.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and int(lengths.max()) > capacity:
        index = int(np.argmax(lengths > capacity))
        raise ValueError(f"example {index} has {int(lengths[index])} tokens > capacity {capacity}")
    order = np.argsort(-lengths, kind="stable")
    assigned: np.ndarray = np.empty(len(order), dtype=np.int64)  # bin of the i-th example placed
    stacks: list[list[int]] = [[] for _ in range(capacity + 1)]
    rooms = 0  # bit r set: some open bin has exactly r tokens of room
    bins = 0
    step = 1 << 16
    for start in range(0, len(order), step):
        chunk = order[start : start + step]
        for at, length in enumerate(lengths[chunk].tolist(), start):
            fits = rooms >> length
            if fits:
                room = length + (fits & -fits).bit_length() - 1
                stack = stacks[room]
                target = stack.pop()
                if not stack:
                    rooms ^= 1 << room
                left = room - length
            else:
                target, bins = bins, bins + 1
                left = capacity - length
            assigned[at] = target
            if left > 0:
                if not stacks[left]:
                    rooms |= 1 << left
                stacks[left].append(target)
    by_bin = np.argsort(assigned, kind="stable")  # keeps each bin's examples in placing order
    return order[by_bin], np.bincount(assigned, minlength=bins).astype(np.int64)


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Group example indices into bins; each bin's total length is <= capacity."""
    flat, sizes = pack_order(np.asarray(lengths, dtype=np.int64), capacity)
    ends = np.cumsum(sizes)
    return [part.tolist() for part in np.split(flat, ends[:-1])] if len(sizes) else []
