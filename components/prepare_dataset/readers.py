"""Read instruction records from files, folders, saved HF datasets, S3 objects or the hub.

Each reader yields `(where, row)` pairs as it reads (JSON Lines and CSV a line at a time,
Parquet a batch at a time; only a JSON list is parsed whole): `where` says where the row came from in the words a
user needs to find it (`data.jsonl:17`, `data.parquet: row 4`). Structural problems (bad JSON,
non-UTF-8 bytes, an object where a list is expected, a CSV without a needed column, an empty
file) are `UserError`s naming the file and line.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..storage import is_s3, s3_cached
from ..tiny_models import cache_root

SAMPLES_DIR = Path(__file__).resolve().parent.parent / "data" / "samples"
# Bytes of a JSON Lines file per LineBatch (about 1,600 samsum rows): cut at a line end.
CHUNK_BYTES = 1 << 20
# The most one JSON Lines/CSV line may hold: a training row is at most a few MB of text.
MAX_ROW_BYTES = 64 << 20
# A .json file is parsed whole (json has no incremental parser): JSON Lines for more.
MAX_JSON_FILE_BYTES = 1 << 30
SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")
Row = tuple[str, dict]


def _decode(path: Path, data: bytes) -> str:
    if not data.strip():
        raise UserError(f"{path}: file is empty")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise UserError(
            f"{path}:{line}: not valid UTF-8 (byte 0x{data[exc.start]:02x} at offset "
            f"{exc.start}); convert the file to UTF-8"
        ) from None


def _row_too_long(path: Path, line: int) -> UserError:
    return UserError(
        f"{path}:{line}: a row of more than {MAX_ROW_BYTES // (1 << 20)} MiB on one line; rows "
        "are refused over that bound (read no further, so memory stays bounded)"
    )


def _not_utf8(path: Path, line: int, byte: int, offset: int) -> UserError:
    return UserError(
        f"{path}:{line}: not valid UTF-8 (byte 0x{byte:02x} at offset {offset}); convert the "
        "file to UTF-8"
    )


def _physical_lines(path: Path) -> Iterator[str]:
    """The file's text one `\n`-terminated piece at a time (end kept), never the whole file.

    Same errors as reading it whole: a file with nothing but whitespace is empty, and bytes that
    are not UTF-8 are named by line and by offset (counted after a BOM). A `\r\n` pair never
    straddles two pieces, so splitting each piece further gives the lines of the whole text.
    """
    seen_text, offset = False, 0
    with open(path, "rb") as f:
        for number, raw in enumerate(iter(lambda: f.readline(MAX_ROW_BYTES + 1), b""), start=1):
            if len(raw) > MAX_ROW_BYTES:
                raise _row_too_long(path, number)
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # offsets count from after the BOM, as decoding it whole
            try:
                piece = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise _not_utf8(path, number, raw[exc.start], offset + exc.start) from None
            offset += len(raw)
            seen_text = seen_text or not piece.isspace()
            yield piece
    if not seen_text:
        raise UserError(f"{path}: file is empty")


def _jsonl_row(path: Path | str, number: int, line: str) -> dict:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise UserError(
            f"{path}:{number}: malformed JSON ({exc.msg} at column {exc.colno})"
        ) from None
    if not isinstance(row, dict):
        raise UserError(
            f"{path}:{number}: expected a JSON object per line, got {type(row).__name__}"
        )
    return row


def _jsonl(path: Path, lines: Iterator[str]) -> Iterator[Row]:
    """One JSON object per line; line numbers are those of `str.splitlines` over the file."""
    number = 0
    for piece in lines:
        batch = LineBatch(str(path), number, piece.splitlines())
        yield from batch.records()
        number += len(batch.lines)


@dataclass(frozen=True)
class LineBatch:
    """Lines of a JSON Lines file, not yet parsed: the main process only cuts the file (one
    decode and one `splitlines` per CHUNK_BYTES), and whoever encodes the batch parses its
    rows (`records`), so the per-row work runs in the workers."""

    path: str
    before: int  # `str.splitlines` lines of the file before this batch
    lines: list[str]

    def records(self) -> Iterator[Row]:
        """The batch's rows in order; a bad line raises UserError (file:line) when reached."""
        for index, line in enumerate(self.lines, start=self.before + 1):
            if line.strip():
                yield f"{self.path}:{index}", _jsonl_row(self.path, index, line)


def _jsonl_batches(path: Path) -> Iterator[LineBatch]:
    """The file as LineBatches of whole lines, with `_jsonl` over `_physical_lines`' errors
    and line numbers: bytes that are not UTF-8 are named by physical line and by offset
    (counted after a BOM), after every line before them; a whitespace-only file is empty."""
    seen_text, before, physical, offset = False, 0, 0, 0
    rest = b""
    with open(path, "rb") as f:
        first = True
        while True:
            block = f.read(CHUNK_BYTES)
            if first and block.startswith(b"\xef\xbb\xbf"):
                block = block[3:]
            first = False
            data = rest + block
            cut = data.rfind(b"\n") + 1 if block else len(data)
            chunk, rest = data[:cut], data[cut:]
            if chunk:
                try:
                    text = chunk.decode("utf-8")
                except UnicodeDecodeError as exc:
                    good = chunk[: chunk.rfind(b"\n", 0, exc.start) + 1]
                    if good:  # the lines before the bad one, as a line-by-line read gives them
                        yield LineBatch(str(path), before, good.decode("utf-8").splitlines())
                    line = physical + chunk.count(b"\n", 0, exc.start) + 1
                    raise _not_utf8(path, line, chunk[exc.start], offset + exc.start) from None
                seen_text = seen_text or not text.isspace()
                lines = text.splitlines()
                yield LineBatch(str(path), before, lines)
                before += len(lines)
                physical += chunk.count(b"\n")
                offset += len(chunk)
            if len(rest) > MAX_ROW_BYTES:  # memory stays bounded: refused, not read on
                raise _row_too_long(path, physical + 1)
            if not block:
                break
    if not seen_text:
        raise UserError(f"{path}: file is empty")


def _json(path: Path, text: str) -> Iterator[Row]:
    stripped = text.lstrip()
    if stripped.startswith("{"):
        # Either JSON Lines under a .json name, or one object where a list is expected.
        try:
            whole = json.loads(text)
        except json.JSONDecodeError:
            yield from _jsonl(path, iter([text]))
            return
        keys = ", ".join(list(whole)[:5])
        raise UserError(
            f"{path}: expected a JSON list of records (or JSON Lines), got one object "
            f"with keys {keys}"
        )
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(
            f"{path}:{exc.lineno}: malformed JSON ({exc.msg} at column {exc.colno})"
        ) from None
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    for index, row in enumerate(data, start=1):
        if not isinstance(row, dict):
            raise UserError(f"{path}: row {index}: expected an object, got {type(row).__name__}")
        yield f"{path}: row {index}", row


def _csv_lines(pieces: Iterator[str]) -> Iterator[str]:
    """Lines as `io.StringIO(whole_text, newline="")` gives them (`\n`, `\r\n` and `\r`)."""
    for piece in pieces:
        yield from io.StringIO(piece, newline="")


def _csv(path: Path, pieces: Iterator[str], required: tuple[str, ...]) -> Iterator[Row]:
    reader = csv.reader(_csv_lines(pieces))
    try:
        header = next(reader)
    except StopIteration:
        raise UserError(f"{path}: file is empty") from None
    except csv.Error as exc:
        raise UserError(f"{path}:1: malformed CSV header ({exc})") from None
    header = [h.strip() for h in header]
    missing = [name for name in required if name not in header]
    if missing:
        raise UserError(
            f"{path}:1: CSV header has no column {', '.join(map(repr, missing))} "
            f"(columns: {', '.join(header)})"
        )
    start = reader.line_num + 1
    while True:
        try:
            values = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise UserError(f"{path}:{start}: malformed CSV ({exc})") from None
        if values:
            if len(values) != len(header):
                raise UserError(f"{path}:{start}: expected {len(header)} fields, got {len(values)}")
            yield f"{path}:{start}", dict(zip(header, values, strict=True))
        start = reader.line_num + 1


def _parquet(path: Path, required: tuple[str, ...]) -> Iterator[Row]:
    """Row groups a batch at a time: never the whole table in memory."""
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
        names = table.schema_arrow.names
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise UserError(f"{path}: cannot read Parquet ({exc})") from None
    missing = [name for name in required if name not in names]
    if missing:
        raise UserError(
            f"{path}: Parquet file has no column {', '.join(map(repr, missing))} "
            f"(columns: {', '.join(names)})"
        )
    if table.metadata.num_rows == 0:
        raise UserError(f"{path}: file has no rows")
    index = 0
    try:
        for batch in table.iter_batches(batch_size=4096):
            for row in batch.to_pylist():
                index += 1
                yield f"{path}: row {index}", row
    except (OSError, ValueError) as exc:  # a damaged page further in (ArrowInvalid)
        raise UserError(f"{path}: row {index + 1}: cannot read Parquet ({exc})") from None


def read_file(
    path: Path, required: tuple[str, ...] = (), line_batches: bool = False
) -> Iterator[Row | LineBatch]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        yield from _parquet(path, required)
        return
    if suffix not in SUFFIXES:
        raise UserError(
            f"{path}: unsupported file type {suffix or '(none)'}; use .json, .jsonl, "
            ".csv or .parquet"
        )
    if suffix == ".csv":
        yield from _csv(path, _physical_lines(path), required)
    elif suffix == ".jsonl":
        yield from _jsonl_batches(path) if line_batches else _jsonl(path, _physical_lines(path))
    else:
        # A JSON list is parsed whole (json has no incremental parser); JSON Lines stream.
        size = path.stat().st_size
        if size > MAX_JSON_FILE_BYTES:
            raise UserError(
                f"{path}: {size:,} bytes; a .json file is parsed whole, so it is refused over "
                f"{MAX_JSON_FILE_BYTES >> 30} GiB: write it as JSON Lines (.jsonl), which stream"
            )
        yield from _json(path, _decode(path, path.read_bytes()))


def _hf_rows(dataset, origin: str) -> Iterator[Row]:
    for index, row in enumerate(dataset, start=1):
        yield f"{origin}: row {index}", row


def _is_saved_dataset(folder: Path) -> bool:
    return any(
        (folder / name).is_file()
        for name in ("dataset_dict.json", "dataset_info.json", "state.json")
    )


def _saved_dataset(folder: Path, split: str) -> Iterator[Row]:
    from datasets import DatasetDict, load_from_disk

    loaded = load_from_disk(str(folder))
    if isinstance(loaded, DatasetDict):
        if split not in loaded:
            raise UserError(
                f"{folder}: saved dataset has no split {split!r} (splits: "
                f"{', '.join(loaded)}); set data.split"
            )
        loaded = loaded[split]
    yield from _hf_rows(loaded, str(folder))


def _folder(
    folder: Path, required: tuple[str, ...], split: str, line_batches: bool = False
) -> Iterator[Row | LineBatch]:
    if _is_saved_dataset(folder):
        yield from _saved_dataset(folder, split)
        return
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in SUFFIXES and p.is_file())
    if not files:
        raise UserError(
            f"{folder}: folder holds no .json, .jsonl, .csv or .parquet file and is "
            "not a saved HF dataset"
        )
    for file in files:
        yield from read_file(file, required, line_batches)


def _hub(name: str, split: str) -> Iterator[Row]:
    import datasets

    try:
        loaded = datasets.load_dataset(name, split=split)
    except Exception as exc:  # offline, missing, gated: all are the user's to fix
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(
            f"data.path: {name!r} is not a local file or folder, and loading it as a "
            f"hub dataset failed: {first}"
        ) from None
    yield from _hf_rows(loaded, name)


def read_records(
    spec: str, required: tuple[str, ...] = (), split: str = "train", line_batches: bool = False
) -> Iterator[Row | LineBatch]:
    """Every row of `data.path`, whatever kind of place it names; with `line_batches`, a JSON
    Lines file's rows come as LineBatches for the encoder to parse."""
    if spec.startswith("sample://"):
        path = SAMPLES_DIR / f"{spec[len('sample://') :]}.jsonl"
        if not path.is_file():
            known = ", ".join(sorted(p.stem for p in SAMPLES_DIR.glob("*.jsonl")))
            raise UserError(f"data.path: no sample {spec!r}; shipped samples: {known}")
        yield from read_file(path, required, line_batches)
        return
    if is_s3(spec):
        local = s3_cached(spec, cache_root() / "s3")
        yield from (
            _folder(local, required, split, line_batches)
            if local.is_dir()
            else read_file(local, required, line_batches)
        )
        return
    path = Path(spec).expanduser()
    if path.is_dir():
        yield from _folder(path, required, split, line_batches)
    elif path.is_file():
        yield from read_file(path, required, line_batches)
    elif (
        path.suffix.lower() in SUFFIXES
        or spec.startswith((".", "/", "~"))
        or path.parent.exists()
        and path.parent != Path(".")
    ):
        raise UserError(f"data.path: {spec} does not exist")
    else:
        yield from _hub(spec, split)
