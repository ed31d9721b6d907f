"""prepare at scale: batches in `data.num_proc` workers, rows spilled to disk, Arrow shards written a
chunk at a time. The output must not depend on num_proc, must be what `datasets` itself writes,
and bad rows must be reported exactly as a single loop would."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pyarrow as pa
import pytest
from datasets import Dataset, load_from_disk

from kubetune.components.prepare_dataset.arrow_out import SplitWriter, chunk_table, table_nbytes
from kubetune.components.prepare_dataset.encode import BATCH_ROWS
from kubetune.components.prepare_dataset.ragged import Rows, offsets_of

from .conftest import TINY_DEMO, assert_user_error, run_prepare, write_jsonl

ROWS = 2 * BATCH_ROWS + 321  # three batches: the workers start after the second


def varied_rows(n: int, unusable: bool = True) -> list[dict]:
    """samsum rows of many lengths (some over max_seq_len), non-ASCII text, and (unless told
    otherwise) a few unusable ones."""
    rows = []
    for i in range(n):
        turns = "\r\n".join(f"P{j}: message {i} number {j} café ✓" for j in range(1 + i % 17))
        row = {"dialogue": turns, "summary": f"Summary {i}: {'long ' * (i % 11)}end."}
        if unusable and i % 97 == 5:
            row["summary"] = None  # dropped: null_field:summary
        if unusable and i % 89 == 7:
            row["summary"] = "   "  # dropped: empty_response
        rows.append(row)
    return rows


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """The same file prepared with num_proc 1, 2 and 3 (3 does not divide the batches evenly)."""
    tmp = tmp_path_factory.mktemp("streaming")
    data = write_jsonl(tmp / "rows.jsonl", varied_rows(ROWS))
    results = {}
    for num_proc in (1, 2, 3):
        out = tmp / f"out{num_proc}"
        result = run_prepare(
            out,
            f"data.path={data}",
            "data.format=samsum",
            "data.max_seq_len=96",
            "data.packing=true",
            "data.on_bad_row=drop",
            "data.eval_fraction=0.1",
            f"data.num_proc={num_proc}",
        )
        assert result.code == 0, result
        results[num_proc] = (out, result)
    return results


def files_of(folder):
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != "recipe.yaml"  # the recipe records num_proc itself
    }


def test_output_is_byte_identical_for_any_num_proc(outputs):
    one = files_of(outputs[1][0])
    assert "train/data-00000-of-00001.arrow" in one and "eval/state.json" in one
    assert not any(name.startswith(".") for name in one)  # no spill left behind
    for num_proc in (2, 3):
        other = files_of(outputs[num_proc][0])
        assert other.keys() == one.keys()
        for name in one:
            assert other[name] == one[name], f"{name} differs with num_proc={num_proc}"
    stats = json.loads(one["stats.json"])
    assert stats["rows_read"] == ROWS
    assert stats["rows_dropped"]["null_field:summary"] == len(range(5, ROWS, 97))
    assert stats["truncated_rows"] > 0 and stats["splits"]["train"] < stats["examples"]["train"]


def test_output_is_what_datasets_writes(outputs, tmp_path):
    """Load it with datasets, save it again with datasets: the same metadata bytes and tables;
    the fingerprint is sha256 over the loaded columns in the documented order."""
    out = outputs[2][0]
    loaded = load_from_disk(str(out))
    stats = json.loads((out / "stats.json").read_text())
    digest = hashlib.sha256()
    for split in ("train", "eval"):
        table = loaded[split].data.table
        for column in ("input_ids", "labels", "position_ids"):
            values = pa.chunked_array(table.column(column)).combine_chunks().flatten()
            digest.update(values.to_numpy().astype(np.int32).tobytes())
        state = json.loads((out / split / "state.json").read_text())
        assert state["_fingerprint"] == digest.hexdigest()[:16]  # the digest so far
        again = tmp_path / split
        loaded[split].save_to_disk(str(again))
        assert (again / "dataset_info.json").read_bytes() == (
            out / split / "dataset_info.json"
        ).read_bytes()
        reread = load_from_disk(str(again)).data.table
        assert reread.equals(table)
    assert digest.hexdigest() == stats["fingerprint"]
    assert stats["tokens"]["train"] == sum(len(r) for r in loaded["train"]["input_ids"])


def test_progress_lines_off_a_terminal(outputs):
    err = outputs[2][1].err
    assert f"prepare: {ROWS:,} rows read, " in err and " rows/s" in err
    assert "\r" not in err  # plain lines in a pod or a CI log


@pytest.mark.parametrize("max_shard", ["40KB", "500MB"])
def test_shards_and_batches_match_save_to_disk(tmp_path, monkeypatch, max_shard):
    """SplitWriter, fed in chunks, makes the shards and record batches save_to_disk makes."""
    from datasets import config

    monkeypatch.setattr(config, "MAX_SHARD_SIZE", max_shard)
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 60, size=2500)
    ids = rng.integers(0, 1000, size=int(lengths.sum())).astype(np.int32)
    rows = Rows(ids, np.where(ids % 3 == 0, -100, ids).astype(np.int32), offsets_of(lengths))
    positions = rows.position_ids()
    texts = {"prompt": [f"p{i} é" * (i % 5) for i in range(len(rows))], "reference": ["r"] * 2500}
    whole = chunk_table(rows, positions, texts)
    text_bytes = [sum(len(t.encode()) for t in v) for v in texts.values()]
    assert table_nbytes(len(rows), len(ids), text_bytes) == whole.nbytes

    ours = tmp_path / "ours"
    writer = SplitWriter(ours, len(rows), whole.nbytes, tuple(texts))
    writer.write(lambda first, end: whole.slice(first, end - first))
    writer.finish("0123456789abcdef")
    theirs = tmp_path / "theirs"
    Dataset(whole, fingerprint="0123456789abcdef").save_to_disk(str(theirs))

    names = sorted(p.name for p in theirs.iterdir())
    assert sorted(p.name for p in ours.iterdir()) == names
    assert (len(names) > 3) == (max_shard == "40KB")  # several shards when they are small
    for name in names:
        if name.endswith(".json"):
            assert (ours / name).read_bytes() == (theirs / name).read_bytes(), name
            continue
        batches = [pa.ipc.open_stream(pa.memory_map(str(d / name))) for d in (ours, theirs)]
        mine, reference = (list(reader) for reader in batches)
        assert [b.num_rows for b in mine] == [b.num_rows for b in reference]
        assert pa.Table.from_batches(mine).equals(pa.Table.from_batches(reference))
        assert batches[0].schema.equals(batches[1].schema, check_metadata=True)


def bad_file(tmp_path, replace: dict[int, str]):
    """ROWS good samsum lines with some lines (1-based) replaced by raw text."""
    lines = [json.dumps(r) for r in varied_rows(ROWS, unusable=False)]
    for number, text in replace.items():
        lines[number - 1] = text
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def prepare_bad(tmp_path, path, num_proc):
    result = run_prepare(
        tmp_path / "out",
        f"data.path={path}",
        "data.format=samsum",
        f"data.num_proc={num_proc}",
    )
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith((".out", "out"))]
    assert leftovers == [], f"output left behind: {leftovers}"
    return result


def test_first_error_in_file_order_with_workers(tmp_path):
    """A bad row in the second batch comes before malformed JSON in the third; with both
    gone, malformed JSON deep in the file is named by line."""
    path = bad_file(tmp_path, {1500: '{"dialogue": "A: hi"}', 2200: '{"dialogue": '})
    assert_user_error(
        prepare_bad(tmp_path, path, 2),
        f"{path}:1500: missing field 'summary'",
        "data.on_bad_row=drop",
    )
    path = bad_file(tmp_path, {2200: '{"dialogue": '})
    assert_user_error(prepare_bad(tmp_path, path, 2), f"{path}:2200: malformed JSON")


def test_invalid_utf8_deep_in_a_stream(tmp_path):
    path = bad_file(tmp_path, {})
    data = path.read_bytes().split(b"\n")
    data[2050] = data[2050].replace(b"message", b"m\xe9ssage", 1)
    path.write_bytes(b"\n".join(data))
    offset = sum(len(line) + 1 for line in data[:2050]) + data[2050].index(b"\xe9")
    assert_user_error(
        prepare_bad(tmp_path, path, 2),
        f"{path}:2051: not valid UTF-8 (byte 0xe9 at offset {offset})",
    )


def test_encoder_survives_pickling_for_spawned_workers():
    """Where fork does not exist, workers get the Encoder pickled: the template format's render
    closure is rebuilt there and encodes the same rows."""
    import pickle

    from kubetune.components.config import load_recipe
    from kubetune.components.models import load_prepare_tokenizer
    from kubetune.components.prepare_dataset.encode import Encoder

    cfg = load_recipe(
        TINY_DEMO,
        ["data.format=template", "data.template=Talk: {dialogue}", "data.response_field=summary"],
    )
    encoder = Encoder(cfg.data, load_prepare_tokenizer(cfg.model))
    records = [(f"rows.jsonl:{i + 1}", row) for i, row in enumerate(varied_rows(50, False))]
    here, there = encoder(records), pickle.loads(pickle.dumps(encoder))(records)
    assert here.spill.tokens == there.spill.tokens and len(here.spill.tokens) > 0
    assert np.array_equal(here.spill.lengths, there.spill.lengths)
    assert here.spill.prompt == there.spill.prompt
    assert here.spill.prompt.startswith(b"Talk: P0: message 0")
