"""Token rows and texts kept on disk while prepare runs; only offsets stay in memory.

Every kept example is appended as it is encoded: its tokens (uint32 each: the id, and in the top
bit whether it is trained on, so the label is the id or -100) and its prompt and reference text
(UTF-8). The train/eval split and packing need only the lengths; the output is then written by
reading rows back a chunk at a time, each example with one positioned read into the chunk's
array. (A memory map would be simpler, but a scattered gather through one faults in ~64 KB
around every example it touches, so memory would grow with the file.)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..artifacts import IGNORE_INDEX
from .ragged import Rows, offsets_of

TRAINED = np.uint32(1 << 31)  # token ids are far below 2**31


@dataclass
class SpillBatch:
    """A batch of kept examples as the spill files hold them: what an encoder (a worker)
    hands the main process, which only appends the bytes."""

    tokens: bytes  # uint32 per token: the id, TRAINED when it is trained on
    lengths: np.ndarray  # tokens per example (int64)
    prompt: bytes  # the examples' prompt texts, UTF-8, one after another
    prompt_lengths: np.ndarray  # bytes per example (int64)
    ref: bytes
    ref_lengths: np.ndarray

    @classmethod
    def of(cls, rows: Rows, prompts: list[str], references: list[str]) -> SpillBatch:
        tokens = rows.ids.astype(np.uint32) | np.where(rows.labels != IGNORE_INDEX, TRAINED, 0)
        texts = []
        for strings in (prompts, references):
            encoded = [t.encode("utf-8") for t in strings]
            texts += [b"".join(encoded), np.fromiter(map(len, encoded), np.int64, len(encoded))]
        return cls(tokens.astype(np.uint32).tobytes(), rows.lengths.astype(np.int64), *texts)


class Spill:
    def __init__(self, folder: Path):
        folder.mkdir(parents=True)
        self.paths = {name: folder / f"{name}.bin" for name in ("tokens", "prompt", "ref")}
        # open until close(): batches arrive one add() at a time
        self.files = {name: open(path, "wb") for name, path in self.paths.items()}  # noqa: SIM115
        self._lengths: list[np.ndarray] = []
        self._text_lengths: dict[str, list[np.ndarray]] = {"prompt": [], "ref": []}
        self.lengths: np.ndarray = np.zeros(0, dtype=np.int64)
        self.offsets: np.ndarray = np.zeros(1, dtype=np.int64)

    def add(self, batch: SpillBatch) -> None:
        self.files["tokens"].write(batch.tokens)
        self._lengths.append(batch.lengths)
        for name, data, lengths in (
            ("prompt", batch.prompt, batch.prompt_lengths),
            ("ref", batch.ref, batch.ref_lengths),
        ):
            self.files[name].write(data)
            self._text_lengths[name].append(lengths)

    def close(self) -> None:
        """Finish writing; from here on rows can be read back."""
        for f in self.files.values():
            f.close()
        self.lengths = np.concatenate(self._lengths) if self._lengths else self.lengths
        self.offsets = offsets_of(self.lengths)
        self.text_offsets = {
            name: offsets_of(np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64))
            for name, parts in self._text_lengths.items()
        }
        self._lengths, self._text_lengths = [], {}

    def __len__(self) -> int:
        return len(self.lengths)

    def _read(self, name: str, starts: np.ndarray, sizes: np.ndarray, out: np.ndarray) -> None:
        """Bytes [starts[i], starts[i] + sizes[i]) of file `name`, one after another, into out."""
        view, at = memoryview(out.data).cast("B"), 0
        fd = os.open(self.paths[name], os.O_RDONLY)
        try:
            for start, size in zip(starts.tolist(), sizes.tolist(), strict=True):
                if size and os.preadv(fd, [view[at : at + size]], start) != size:
                    raise OSError(f"{self.paths[name]}: short read at {start}")
                at += size
        finally:
            os.close(fd)

    def rows(self, index: np.ndarray) -> Rows:
        """Examples `index`, in that order, as rows of ids and labels."""
        index = np.asarray(index, dtype=np.int64)
        lengths = self.lengths[index]
        tokens: np.ndarray = np.empty(int(lengths.sum()), dtype=np.uint32)
        self._read("tokens", self.offsets[:-1][index] * 4, lengths * 4, tokens)
        ids = (tokens & ~TRAINED).astype(np.int32)
        labels = np.where(tokens & TRAINED, ids, IGNORE_INDEX).astype(np.int32)
        return Rows(ids, labels, offsets_of(lengths))

    def texts(self, name: str, index: np.ndarray) -> list[str]:
        """The `prompt` or `ref` texts of examples `index`."""
        index = np.asarray(index, dtype=np.int64)
        offsets = self.text_offsets[name]
        sizes = offsets[index + 1] - offsets[index]
        data: np.ndarray = np.empty(int(sizes.sum()), dtype=np.uint8)
        self._read(name, offsets[index], sizes, data)
        ends = offsets_of(sizes)
        raw = data.tobytes()
        return [raw[a:b].decode("utf-8") for a, b in zip(ends[:-1], ends[1:], strict=True)]

    def text_bytes(self, name: str, index: np.ndarray) -> int:
        offsets = self.text_offsets[name]
        index = np.asarray(index, dtype=np.int64)
        return int((offsets[index + 1] - offsets[index]).sum())
