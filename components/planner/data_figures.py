"""What `kubetune plan` knows of the data (`data_figures`): the train and eval rows, the
computed tokens per row and the attention span, from a prepared dataset's stats.json, else
from the data source's record count (a local file; a known hub dataset's published size)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..config import RunConfig
from ..errors import UserError
from ..objectives import row_tokens

# Published train-split sizes of hub datasets the recipes use (no download to plan).
KNOWN_DATASET_ROWS = {
    "databricks/databricks-dolly-15k": 15011,
    "knkarthick/samsum": 14732,
    "samsum": 14732,
    "tatsu-lab/alpaca": 52002,
    "yahma/alpaca-cleaned": 51760,
    "timdettmers/openassistant-guanaco": 9846,
    "knkarthick/dialogsum": 12460,
}


@dataclass(frozen=True)
class Data:
    """What the wall time needs of the data: rows to train on and how long they are."""

    train_rows: int | None
    eval_rows: int
    row_len: int  # computed tokens per row
    span: int  # attention span per token
    train_tokens: int | None  # real (unpadded) tokens of the train split, when known
    source: str  # where the figures come from


def row_shape(seq: int, packed: bool, lengths: dict, per_row: int = 1) -> tuple[int, int]:
    """(computed tokens of a row, attention span per token): packed rows are `seq` long and a
    token attends within its example (the mean one); an unpacked row is padded to the longest
    example and attends over it. `per_row`: examples an unpacked row holds (2: a preference
    pair, each document attending within itself)."""
    longest = min(seq, int(lengths["max"]) * per_row)
    mean = max(1, min(seq, round(float(lengths["mean"]))))
    if per_row > 1:  # a pair's documents attend within themselves
        return (seq, mean) if packed else (longest, min(seq, int(lengths["max"])))
    return (seq, mean) if packed else (longest, longest)


def data_figures(cfg: RunConfig, dataset: str | Path | None) -> Data:
    seq = row_tokens(cfg)
    per_row = seq // cfg.data.max_seq_len
    if dataset is not None:
        stats_file = Path(dataset) / "stats.json"
        try:
            stats = json.loads(stats_file.read_text())
            rows = int(stats["splits"]["train"])
            eval_rows = int(stats["splits"].get("eval", 0))
            packed = bool(stats["packing"]["enabled"])
            row_len, span = row_shape(seq, packed, stats["example_length"], per_row)
            tokens = int(stats["tokens"]["train"])
        except OSError as exc:
            raise UserError(f"--dataset {dataset}: no prepared dataset ({exc.strerror})") from None
        except (ValueError, KeyError, TypeError) as exc:
            raise UserError(f"{stats_file}: not a kubetune stats.json ({exc!r})") from None
        return Data(rows, eval_rows, row_len, span, tokens, f"{stats_file}")
    examples, where = source_rows(cfg)
    if examples is None:
        return Data(None, 0, seq, seq, None, where)
    eval_rows = int(examples * cfg.data.eval_fraction)
    return Data(
        examples - eval_rows,
        eval_rows,
        seq,
        seq,
        None,
        f"{where}: {examples} {'pairs' if per_row > 1 else 'examples'}, each taken as one row "
        f"of {seq} tokens "
        "(pass --dataset for the prepared rows)",
    )


def source_rows(cfg: RunConfig) -> tuple[int | None, str]:
    """Records of the data source: counted in a local file, or a hub dataset's known size."""
    path = cfg.data.path
    if path in KNOWN_DATASET_ROWS:
        return KNOWN_DATASET_ROWS[path], f"{path} (its published train split)"
    local = Path(path)
    if path.startswith("sample://"):
        from ..prepare_dataset.readers import SAMPLES_DIR

        local = SAMPLES_DIR / f"{path[len('sample://') :]}.jsonl"
    if local.is_file():
        with open(local, "rb") as f:
            if local.suffix in (".jsonl", ".csv"):
                lines = sum(1 for line in f if line.strip())
                return lines - (local.suffix == ".csv"), str(local)
            if local.suffix == ".json":
                try:
                    records = json.load(f)
                except ValueError:
                    return None, f"{local}: not JSON"
                if isinstance(records, list):
                    return len(records), str(local)
    return None, f"{path}: rows unknown without a download"
