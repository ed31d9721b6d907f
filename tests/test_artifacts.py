"""The contract between the steps: the progress line round-trips, and the model-folder kinds
are told apart the same way for every step."""

from __future__ import annotations

import math

import pytest

from kubetune.components.artifacts import (
    ADAPTER_SPEC_FILE,
    MERGE_FILE,
    MODEL_CONFIG_FILE,
    PEFT_CONFIG_FILE,
    BaseModelRecord,
    ModelKind,
    ProgressLine,
    model_folder,
)


def test_progress_line_round_trips():
    line = ProgressLine(12, 40, 1.234567, 2e-4, 18123.4, 30, "1m05s")
    text = line.format()
    assert text == "step 12/40 loss 1.2346 lr 2.00e-04 tokens/s 18123 progress 30% eta 1m05s"
    back = ProgressLine.parse("   " + text)
    assert (back.step, back.steps, back.tokens_per_second, back.percent, back.eta) == (
        12,
        40,
        18123.0,
        30,
        "1m05s",
    )
    assert back.loss == pytest.approx(1.2346)


def test_progress_line_parses_short_and_nan_lines_and_refuses_others():
    short = ProgressLine.parse("step 5/20 loss 6.5100 lr 1.00e-02 tokens/s 17961")
    assert (short.step, short.loss, short.eta, short.percent) == (5, 6.51, None, None)
    assert math.isnan(ProgressLine.parse("step 1/2 loss nan lr 1e-3").loss)
    assert ProgressLine.parse("step 1/2 loss n") is None
    assert ProgressLine.parse("resuming from ckpt (step 3 of 9)") is None


@pytest.mark.parametrize(
    ("files", "kind", "needs_base", "prompts"),
    [
        ([PEFT_CONFIG_FILE], ModelKind.LORA, True, False),
        ([ADAPTER_SPEC_FILE], ModelKind.PROMPTS, True, True),
        ([ADAPTER_SPEC_FILE, MODEL_CONFIG_FILE], ModelKind.PROMPTS, False, True),
        ([MERGE_FILE, MODEL_CONFIG_FILE], ModelKind.MERGED, False, False),
        ([MERGE_FILE, MODEL_CONFIG_FILE, ADAPTER_SPEC_FILE], ModelKind.MERGED, False, True),
        ([MODEL_CONFIG_FILE], ModelKind.FULL, False, False),
        (["notes.txt"], ModelKind.FILES, False, False),
    ],
)
def test_model_folder_kinds(tmp_path, files, kind, needs_base, prompts):
    for name in files:
        (tmp_path / name).write_text("{}")
    folder = model_folder(tmp_path)
    assert (folder.kind, folder.needs_base, folder.has_prompts) == (kind, needs_base, prompts)


def test_base_model_record_round_trips_and_reads_older_records(tmp_path):
    assert BaseModelRecord.read(tmp_path) is None
    record = BaseModelRecord("tiny://llama", "main", "abc", "lora", "f00")
    record.write(tmp_path)
    assert BaseModelRecord.read(tmp_path) == record
    (tmp_path / "base_model.json").write_text('{"name_or_path": "x", "extra": 1}\n')
    assert BaseModelRecord.read(tmp_path) == BaseModelRecord("x")
