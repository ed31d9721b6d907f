"""`kubetune prepare` through the real CLI on real files, checked against the tokenizer itself."""

from __future__ import annotations

import csv
import itertools
import json
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasets import Dataset, DatasetDict, load_from_disk
from transformers import AutoTokenizer

from kubetune.components.models import resolve_model
from kubetune.components.prepare_dataset.formats import (
    ALPACA_PROMPT,
    ALPACA_PROMPT_NO_INPUT,
    SAMSUM_PROMPT,
)

from .conftest import (
    TINY_DEMO,
    alpaca_rows,
    dolly_rows,
    run_prepare,
    samsum_rows,
    write_json,
    write_jsonl,
)


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(resolve_model("tiny://falcon"))


def prepare(cli, tmp_path, path, fmt, *sets):
    out = tmp_path / "out"
    result = run_prepare(out, f"data.path={path}", f"data.format={fmt}", *sets)
    assert result.code == 0, result
    return load_from_disk(str(out)), json.loads((out / "stats.json").read_text())


def expected_row(tokenizer, prompt: str, response: str):
    """Reference tokenization with the tokenizer's own __call__ (not kubetune's batched path)."""
    p = tokenizer(prompt)["input_ids"]
    r = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return p + r, [-100] * len(p) + r


def unpacked_examples(split):
    """Cut packed rows back into examples at position_ids == 0."""
    examples = []
    for row in split:
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["input_ids"])]
        for a, b in itertools.pairwise(starts):
            assert row["position_ids"][a:b] == list(range(b - a))
            examples.append((tuple(row["input_ids"][a:b]), tuple(row["labels"][a + 1 : b])))
    return examples


def test_alpaca_json_masks_the_prompt(cli, tmp_path, tokenizer):
    rows = alpaca_rows(40)
    ds, stats = prepare(
        cli,
        tmp_path,
        write_json(tmp_path / "a.json", rows),
        "alpaca",
        "data.packing=false",
        "data.eval_fraction=0.25",
    )
    assert isinstance(ds, DatasetDict) and set(ds) == {"train", "eval"}
    assert stats["rows_read"] == 40 and stats["rows_kept"] == 40
    assert stats["splits"] == {"train": 30, "eval": 10}
    expected = {}
    for row in rows:
        template = ALPACA_PROMPT if row["input"] else ALPACA_PROMPT_NO_INPUT
        ids, labels = expected_row(tokenizer, template.format(**row), row["output"])
        expected[tuple(ids)] = labels
    for split in ("train", "eval"):
        for row in ds[split]:
            assert expected[tuple(row["input_ids"])] == row["labels"]
            assert len(row["input_ids"]) <= 256
    # eval keeps its prompt and reference for generation
    row = ds["eval"][0]
    assert row["prompt"].startswith("Below is an instruction") and row["reference"].startswith(
        "The sum is"
    )


def test_dolly_jsonl_with_packing(cli, tmp_path, tokenizer):
    rows = dolly_rows(120)
    ds, stats = prepare(
        cli,
        tmp_path,
        write_jsonl(tmp_path / "d.jsonl", rows),
        "dolly",
        "data.packing=true",
        "data.max_seq_len=200",
    )
    reference = Counter()
    for row in rows:
        template = ALPACA_PROMPT if row["context"] else ALPACA_PROMPT_NO_INPUT
        ids, labels = expected_row(
            tokenizer,
            template.format(instruction=row["instruction"], input=row["context"]),
            row["response"],
        )
        reference[(tuple(ids), tuple(labels[1:]))] += 1
    got = Counter(unpacked_examples(ds["train"])) + Counter(
        (tuple(r["input_ids"]), tuple(r["labels"][1:])) for r in ds["eval"]
    )
    assert got == reference  # every example exactly once, masked as the tokenizer says
    for row in ds["train"]:
        assert len(row["input_ids"]) <= 200
    assert stats["splits"]["train"] < stats["examples"]["train"]  # several examples per row
    tokens = sum(len(r["input_ids"]) for r in ds["train"])
    assert stats["packing"]["efficiency"] == pytest.approx(
        tokens / (len(ds["train"]) * 200), abs=1e-4
    )
    # Best-fit decreasing needs no more rows than packing in file order (next fit) would.
    lengths = [len(ids) for ids, _ in unpacked_examples(ds["train"])]
    next_fit, room = 0, 0
    for length in lengths:
        if length > room:
            next_fit, room = next_fit + 1, 200
        room -= length
    assert len(ds["train"]) <= next_fit


def test_samsum_jsonl_with_crlf(cli, tmp_path, tokenizer):
    rows = samsum_rows(30)
    ds, stats = prepare(
        cli,
        tmp_path,
        write_jsonl(tmp_path / "s.jsonl", rows, crlf_lines=True),
        "samsum",
        "data.packing=false",
        "data.eval_fraction=0.1",
    )
    assert stats["rows_kept"] == 30
    row = ds["eval"][0]
    assert "\r" not in row["prompt"] and "\nTom:" in row["prompt"]
    ids, labels = expected_row(tokenizer, row["prompt"], row["reference"])
    assert row["input_ids"] == ids and row["labels"] == labels
    assert row["prompt"] == SAMSUM_PROMPT.format(
        dialogue=row["prompt"].split("\n", 1)[1].rsplit("\n---", 1)[0]
    )


def test_csv_with_multiline_fields(cli, tmp_path):
    path = tmp_path / "s.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["id", "dialogue", "summary"])
        writer.writeheader()
        writer.writerows(samsum_rows(20))
    ds, stats = prepare(cli, tmp_path, path, "samsum", "data.eval_fraction=0.2")
    assert stats["rows_read"] == 20 and stats["splits"]["eval"] == 4


@pytest.mark.integration
def test_parquet_and_saved_dataset_and_folder(cli, tmp_path):
    rows = dolly_rows(25)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    _, stats = prepare(cli, tmp_path, tmp_path / "d.parquet", "dolly")
    assert stats["rows_read"] == 25
    saved = tmp_path / "saved"
    DatasetDict(
        {"train": Dataset.from_list(rows), "test": Dataset.from_list(rows[:3])}
    ).save_to_disk(str(saved))
    (tmp_path / "out").rename(tmp_path / "out1")
    _, stats = prepare(cli, tmp_path, saved, "dolly")
    assert stats["rows_read"] == 25
    (tmp_path / "out").rename(tmp_path / "out2")
    folder = tmp_path / "many"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", rows[:10])
    write_json(folder / "b.json", rows[10:])
    _, stats = prepare(cli, tmp_path, folder, "dolly")
    assert stats["rows_read"] == 25


def test_template_format(cli, tmp_path, tokenizer):
    rows = [
        {"question": f"What is {i} squared?", "topic": "math", "answer": str(i * i)}
        for i in range(12)
    ]
    template = "Topic: {topic}\nQ: {question}\nA: "
    ds, _ = prepare(
        cli,
        tmp_path,
        write_jsonl(tmp_path / "t.jsonl", rows),
        "template",
        f"data.template={json.dumps(template)}",
        "data.response_field=answer",
        "data.packing=false",
        "data.eval_fraction=0.25",
    )
    for row in ds["eval"]:
        assert row["prompt"].startswith("Topic: math\nQ: What is ")
        ids, labels = expected_row(tokenizer, row["prompt"], row["reference"])
        assert row["labels"] == labels


def test_chat_format_trains_on_every_assistant_turn(cli, tmp_path, tokenizer):
    rows = [
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": f"Hi {i}"},
                {"role": "assistant", "content": f"Hello {i}!"},
                {"role": "user", "content": "Bye"},
                {"role": "assistant", "content": "Goodbye."},
            ]
        }
        for i in range(10)
    ]
    ds, _ = prepare(
        cli,
        tmp_path,
        write_jsonl(tmp_path / "c.jsonl", rows),
        "chat",
        "data.packing=false",
        "data.eval_fraction=0.2",
    )
    row = ds["train"][0]
    full = tokenizer.apply_chat_template(rows[0]["messages"], tokenize=False)
    assert tokenizer.decode(row["input_ids"]) == full + tokenizer.eos_token
    trained = tokenizer.decode([t for t in row["labels"] if t != -100])
    assert trained.startswith("Hello ") and "Goodbye.<|im_end|>" in trained
    assert "Be brief" not in trained and "Bye" not in trained.replace("Goodbye", "")


# A chat template shaped like gpt-oss's harmony format (written here, for the test): channels,
# the assistant's reasoning rendered as the analysis channel of the last turn only, the last
# turn ending with <|return|> and earlier ones with <|end|>.
HARMONY_LIKE = (
    "{{- '<|start|>system<|message|>A tiny test model.<|end|>' -}}"
    "{%- for message in messages -%}"
    "{%- if message.role == 'assistant' -%}"
    "{%- if loop.last and not add_generation_prompt -%}"
    "{%- if message.thinking is defined -%}"
    "{{- '<|start|>assistant<|channel|>analysis<|message|>' + message.thinking + '<|end|>' -}}"
    "{%- endif -%}"
    "{{- '<|start|>assistant<|channel|>final<|message|>' + message.content + '<|return|>' -}}"
    "{%- else -%}"
    "{{- '<|start|>assistant<|channel|>final<|message|>' + message.content + '<|end|>' -}}"
    "{%- endif -%}"
    "{%- else -%}"
    "{{- '<|start|>' + message.role + '<|message|>' + message.content + '<|end|>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|start|>assistant{%- endif -%}"
)


def test_chat_format_renders_reasoning_through_a_harmony_like_template(cli, tmp_path):
    """A gpt-oss-style template: a single assistant turn trains on its reasoning (`thinking`,
    the analysis channel) and its final answer through <|return|>; a multi-turn row, which
    such a template renders differently once a turn is followed, is dropped with its reason."""
    import shutil

    model = tmp_path / "gpt-oss-like"
    shutil.copytree(resolve_model("tiny://gpt-oss"), model)
    chat = AutoTokenizer.from_pretrained(model)
    chat.chat_template = HARMONY_LIKE
    chat.save_pretrained(model)
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"What is {i} + {i}?"},
                {"role": "assistant", "content": f"{2 * i}", "thinking": f"Add {i} twice."},
            ]
        }
        for i in range(10)
    ]
    rows.append({"messages": [rows[0]["messages"][0], {"role": "assistant", "content": "0"},
                              {"role": "user", "content": "Sure?"},
                              {"role": "assistant", "content": "Yes."}]})  # fmt: skip
    ds, stats = prepare(
        cli, tmp_path, write_jsonl(tmp_path / "c.jsonl", rows), "chat",
        f"model.name_or_path={model}", "data.packing=false", "data.eval_fraction=0.2",
        "data.on_bad_row=drop",
    )  # fmt: skip
    assert stats["rows_dropped"] == {"chat_template": 1}
    row = next(r for r in ds["train"] if "What is 3 + 3?" in chat.decode(r["input_ids"]))
    trained = chat.decode([t for t in row["labels"] if t != -100])
    assert trained.startswith("<|channel|>analysis<|message|>Add 3 twice.<|end|>")
    assert "<|start|>assistant<|channel|>final<|message|>6<|return|>" in trained
    assert "What is" not in trained and "A tiny test model" not in trained


@pytest.mark.integration
def test_overlength_policies(cli, tmp_path):
    rows = alpaca_rows(10) + [
        {"instruction": "word " * 400, "input": "", "output": "short"},
        {"instruction": "Say a lot.", "input": "", "output": "word " * 400},
    ]
    path = write_json(tmp_path / "a.json", rows)
    ds, stats = prepare(
        cli, tmp_path, path, "alpaca", "data.overlength=truncate", "data.packing=false"
    )
    assert stats["truncated_rows"] == 1
    assert stats["rows_dropped"] == {"no_response_after_truncation": 1}
    assert all(len(r["input_ids"]) <= 256 for s in ("train", "eval") for r in ds[s])
    (tmp_path / "out").rename(tmp_path / "out1")
    _, stats = prepare(cli, tmp_path, path, "alpaca", "data.overlength=drop")
    assert stats["rows_dropped"] == {"too_long": 2} and stats["truncated_rows"] == 0


def test_drop_bad_rows_counts_them(cli, tmp_path):
    rows = dolly_rows(10) + [
        {"instruction": "x", "response": None},
        {"instruction": "y"},
        {"instruction": "z", "response": "   "},
    ]
    _, stats = prepare(
        cli, tmp_path, write_jsonl(tmp_path / "d.jsonl", rows), "dolly", "data.on_bad_row=drop"
    )
    assert stats["rows_read"] == 13 and stats["rows_kept"] == 10
    assert stats["rows_dropped"] == {
        "empty_response": 1,
        "missing_field:response": 1,
        "null_field:response": 1,
    }


@pytest.mark.integration
def test_shipped_sample_is_deterministic(cli, tmp_path):
    a = cli("prepare", TINY_DEMO, "--output", tmp_path / "a")
    b = cli("prepare", TINY_DEMO, "--output", tmp_path / "b")
    assert a.code == 0 and b.code == 0, (a, b)
    sa, sb = (json.loads((tmp_path / n / "stats.json").read_text()) for n in "ab")
    assert sa["fingerprint"] == sb["fingerprint"] and sa["rows_read"] == 600
    assert (tmp_path / "a" / "recipe.yaml").is_file()


@pytest.mark.integration
def test_existing_output_needs_overwrite(cli, tmp_path):
    assert cli("prepare", TINY_DEMO, "--output", tmp_path / "o").code == 0
    again = cli("prepare", TINY_DEMO, "--output", tmp_path / "o")
    assert again.code == 2 and "--overwrite" in again.err
    assert cli("prepare", TINY_DEMO, "--output", tmp_path / "o", "--overwrite").code == 0
    assert [p.name for p in tmp_path.iterdir()] == ["o"]
