"""Best-fit-decreasing packing of tokenized examples into rows of at most `capacity` tokens."""

from __future__ import annotations

import bisect


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Group example indices into bins; each bin's total length is <= capacity.

    Examples are placed longest first, each into the open bin it fills most tightly (the bin
    with the least room that still fits it), or a new bin. O(n log n) searches over a sorted
    list of remaining room.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    room: list[int] = []  # sorted remaining room of open bins
    room_bin: list[int] = []  # bin index for each entry of `room`
    for index in order:
        length = lengths[index]
        if length > capacity:
            raise ValueError(f"example {index} has {length} tokens > capacity {capacity}")
        pos = bisect.bisect_left(room, length)
        if pos < len(room):
            left, target = room.pop(pos), room_bin.pop(pos)
            bins[target].append(index)
            left -= length
        else:
            target = len(bins)
            bins.append([index])
            left = capacity - length
        if left > 0:
            at = bisect.bisect_left(room, left)
            room.insert(at, left)
            room_bin.insert(at, target)
    return bins
