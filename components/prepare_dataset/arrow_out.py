"""Write a split the way `datasets`' `save_to_disk` does, a chunk of rows at a time.

`Dataset.save_to_disk` needs the whole table in memory. This writes the same files from chunks:
as many `data-XXXXX-of-NNNNN.arrow` shards as save_to_disk would make for the table's size,
each written with `datasets`' own `ArrowWriter` in batches of the rows save_to_disk would use,
then `state.json` (with our fingerprint) and `dataset_info.json`, byte for byte as
save_to_disk writes them. The Arrow shards hold the same record batches with the same schema;
only the padding between buffers may differ (save_to_disk writes slices of one big table).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from .ragged import Rows

TOKEN_COLUMNS = ("input_ids", "labels", "position_ids")


def schema(text_columns: tuple[str, ...]) -> pa.Schema:
    return pa.schema(
        [(name, pa.list_(pa.int32())) for name in TOKEN_COLUMNS]
        + [(name, pa.string()) for name in text_columns]
    )


def table_nbytes(rows: int, tokens: int, text_bytes: list[int]) -> int:
    """`pa.Table.nbytes` of the split: int32 offsets and values per token column, int32 offsets
    and UTF-8 data per text column (no validity buffers: nothing is null). pyarrow counts 4
    bytes of offsets per row, not the n + 1 offsets the buffer holds."""
    offsets = rows * 4
    return len(TOKEN_COLUMNS) * (offsets + tokens * 4) + sum(offsets + b for b in text_bytes)


def chunk_table(rows: Rows, positions: np.ndarray, texts: dict[str, list[str]]) -> pa.Table:
    offsets = pa.array(rows.offsets.astype(np.int32))
    columns = {
        "input_ids": pa.ListArray.from_arrays(offsets, pa.array(rows.ids.astype(np.int32))),
        "labels": pa.ListArray.from_arrays(offsets, pa.array(rows.labels.astype(np.int32))),
        "position_ids": pa.ListArray.from_arrays(offsets, pa.array(positions.astype(np.int32))),
    }
    columns.update({name: pa.array(values, type=pa.string()) for name, values in texts.items()})
    return pa.table(columns)


class OrderedDigest:
    """sha256 over every chunk's ids, then every chunk's labels, then every chunk's positions,
    split after split: the digest of the whole arrays, concatenated, without holding them.
    Ids are hashed as the chunks are made; labels and positions are read back from the
    split's finished shards, a record batch at a time (from the page cache: they were just
    written; read, not memory-mapped, so the process never maps a whole shard)."""

    def __init__(self):
        self.sha = hashlib.sha256()

    def add(self, rows: Rows) -> None:
        self.sha.update(np.ascontiguousarray(rows.ids, dtype=np.int32).data)

    def end_split(self, shards: list[Path]) -> str:
        """Hash the split's labels and positions, read from its shards in order; returns the
        digest so far (hex)."""
        for name in TOKEN_COLUMNS[1:]:
            for shard in shards:
                with pa.OSFile(str(shard)) as source:
                    for batch in pa.ipc.open_stream(source):
                        values = batch.column(name).flatten()
                        data = values.buffers()[1]
                        start = values.offset * 4
                        self.sha.update(memoryview(data)[start : start + len(values) * 4])
        return self.sha.hexdigest()


class SplitWriter:
    """One split folder in save_to_disk's layout, fed chunk by chunk in row order."""

    def __init__(self, folder: Path, num_rows: int, nbytes: int, text_columns=()):
        from datasets import config
        from datasets.arrow_writer import get_writer_batch_size_from_data_size
        from datasets.utils.py_utils import convert_file_size_to_int

        self.folder, self.num_rows = folder, num_rows
        self.schema = schema(tuple(text_columns))
        shards = int(nbytes / convert_file_size_to_int(config.MAX_SHARD_SIZE)) + 1
        self.num_shards = max(1, min(num_rows, shards))
        self.batch_rows = config.DEFAULT_MAX_BATCH_SIZE
        if nbytes > 0:
            self.batch_rows = min(
                self.batch_rows, get_writer_batch_size_from_data_size(num_rows, nbytes)
            )
        folder.mkdir(parents=True)

    def shard_ranges(self) -> Iterator[tuple[int, int, int]]:
        """(shard, first row, end row): `Dataset.shard(contiguous=True)`'s split of the rows."""
        div, mod = divmod(self.num_rows, self.num_shards)
        for index in range(self.num_shards):
            start = div * index + min(index, mod)
            yield index, start, start + div + (1 if index < mod else 0)

    def chunks(self) -> Iterator[tuple[int, int, int]]:
        """(shard, first row, end row) of each batch save_to_disk would write."""
        for shard, start, end in self.shard_ranges():
            for first in range(start, end, self.batch_rows):
                yield shard, first, min(first + self.batch_rows, end)

    def filename(self, shard: int) -> str:
        return f"data-{shard:05d}-of-{self.num_shards:05d}.arrow"

    def write(self, tables) -> None:
        """Write the tables `tables(first, end)` gives for each batch, shard by shard. The next
        batch's table is made in a thread while this one is written (reading the spill,
        packing, hashing and Arrow's writes release the GIL): the write phase has both cores
        of a 2-core pod instead of one. `tables` is called in batch order, one at a time."""
        from concurrent.futures import ThreadPoolExecutor

        from datasets import Features
        from datasets.arrow_writer import ArrowWriter

        features = Features.from_arrow_schema(self.schema)
        writer: Any = None
        current = None
        chunks = list(self.chunks())
        with ThreadPoolExecutor(1, thread_name_prefix="kubetune-chunk") as maker:
            made = [maker.submit(tables, first, end) for _, first, end in chunks[:1]]
            for index, (shard, _, _) in enumerate(chunks):
                table = made.pop().result()
                if index + 1 < len(chunks):
                    _, first, end = chunks[index + 1]
                    made.append(maker.submit(tables, first, end))
                writer = self._write(writer, shard, current, table, features, ArrowWriter)
                current = shard
        if writer is not None:
            writer.finalize()
            writer.close()

    def _write(self, writer, shard: int, current, table, features, arrow_writer):
        """Append `table` to shard `shard`'s file (closing the previous shard's first)."""
        if shard != current:
            if writer is not None:
                writer.finalize()
                writer.close()
            writer = arrow_writer(
                features=features,
                path=str(self.folder / self.filename(shard)),
                embed_local_files=True,
            )
        writer.write_table(table)
        return writer

    def finish(self, fingerprint: str) -> None:
        """state.json and dataset_info.json, as save_to_disk writes them."""
        from datasets import DatasetInfo, Features
        from datasets.utils.py_utils import asdict  # save_to_disk's, not dataclasses'

        state: dict = {
            "_data_files": [{"filename": self.filename(i)} for i in range(self.num_shards)],
            "_fingerprint": fingerprint,
            "_format_columns": None,
            "_format_kwargs": {},
            "_format_type": None,
            "_output_all_columns": False,
            "_split": None,
        }
        with open(self.folder / "state.json", "w", encoding="utf-8") as f:
            json.dump(state, f, indent=2, sort_keys=True)
        info = asdict(DatasetInfo(features=Features.from_arrow_schema(self.schema)))
        with open(self.folder / "dataset_info.json", "w", encoding="utf-8") as f:
            json.dump({key: info[key] for key in sorted(info)}, f, indent=2)
