"""Every kind of bad input: exit code 2, a message naming file/line/field/row, no output left."""

from __future__ import annotations

import json

import pytest

from .conftest import assert_user_error, dolly_rows, run_prepare, write_jsonl


def run(cli, tmp_path, path, fmt="dolly", *sets):
    result = run_prepare(tmp_path / "out", f"data.path={path}", f"data.format={fmt}", *sets)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith((".out", "out"))]
    assert leftovers == [], f"output left behind: {leftovers}"
    return result


def test_malformed_jsonl_names_file_and_line(cli, tmp_path):
    path = tmp_path / "d.jsonl"
    lines = [json.dumps(r) for r in dolly_rows(5)]
    lines[3] = '{"instruction": "x", "response": "y"'
    path.write_text("\n".join(lines) + "\n")
    assert_user_error(run(cli, tmp_path, path), f"{path}:4: malformed JSON")


def test_malformed_json_list_names_line(cli, tmp_path):
    path = tmp_path / "d.json"
    path.write_text(
        '[\n {"instruction": "a", "response": "b"},\n {"instruction": "c", "response": }\n]\n'
    )
    assert_user_error(run(cli, tmp_path, path), f"{path}:3: malformed JSON")


def test_missing_field_names_field_and_row(cli, tmp_path):
    rows = dolly_rows(5)
    del rows[2]["response"]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    assert_user_error(
        run(cli, tmp_path, path), f"{path}:3: missing field 'response'", "data.on_bad_row=drop"
    )


def test_null_field_in_json_list_names_row(cli, tmp_path):
    rows = dolly_rows(5)
    rows[4]["instruction"] = None
    path = tmp_path / "d.json"
    path.write_text(json.dumps(rows))
    assert_user_error(run(cli, tmp_path, path), f"{path}: row 5: field 'instruction' is null")


def test_wrong_type_field(cli, tmp_path):
    rows = dolly_rows(3)
    rows[1]["response"] = {"text": "nested"}
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    assert_user_error(
        run(cli, tmp_path, path), f"{path}:2: field 'response' must be text, got dict"
    )


@pytest.mark.parametrize("content", [b"", b"\n\n  \n"])
def test_empty_file(cli, tmp_path, content):
    path = tmp_path / "d.jsonl"
    path.write_bytes(content)
    assert_user_error(run(cli, tmp_path, path), f"{path}: file is empty")


def test_non_utf8_bytes_name_the_line(cli, tmp_path):
    path = tmp_path / "d.jsonl"
    good = "\n".join(json.dumps(r) for r in dolly_rows(3)).encode()
    path.write_bytes(good + b'\n{"instruction": "caf\xe9", "response": "x"}\n')
    assert_user_error(run(cli, tmp_path, path), f"{path}:4: not valid UTF-8", "0xe9")


def test_object_where_a_list_is_expected(cli, tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"data": dolly_rows(3)}, indent=2))
    assert_user_error(
        run(cli, tmp_path, path), f"{path}: expected a JSON list of records", "keys data"
    )


def test_csv_missing_a_column(cli, tmp_path):
    path = tmp_path / "s.csv"
    path.write_text("id,dialogue,text\n1,hello,world\n")
    assert_user_error(
        run(cli, tmp_path, path, "samsum"), f"{path}:1: CSV header has no column 'summary'"
    )


def test_csv_short_row_names_line(cli, tmp_path):
    path = tmp_path / "s.csv"
    path.write_text('dialogue,summary\n"A: hi\nB: yo",greeting\nonly-one-field\n')
    assert_user_error(run(cli, tmp_path, path, "samsum"), f"{path}:4: expected 2 fields, got 1")


def test_path_that_does_not_exist(cli, tmp_path):
    assert_user_error(
        run(cli, tmp_path, tmp_path / "missing.jsonl"), "missing.jsonl does not exist"
    )


def test_unknown_format(cli, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", dolly_rows(3))
    assert_user_error(
        run(cli, tmp_path, path, "sharegpt"),
        "data.format must be one of 'alpaca', 'dolly', 'samsum', 'chat', 'template' or 'preference', got 'sharegpt'",
    )


def test_unsupported_file_type(cli, tmp_path):
    path = tmp_path / "d.txt"
    path.write_text("hello\n")
    assert_user_error(run(cli, tmp_path, path), "unsupported file type .txt")


def test_template_field_missing_from_rows(cli, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", dolly_rows(3))
    assert_user_error(
        run(
            cli,
            tmp_path,
            path,
            "template",
            "data.template=Q: {question}",
            "data.response_field=response",
        ),
        f"{path}:1: missing field 'question'",
    )


def test_chat_messages_malformed(cli, tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "wizard", "content": "hi"}]}])
    assert_user_error(run(cli, tmp_path, path, "chat"), f"{path}:1: messages[0].role must be")


def test_all_rows_dropped(cli, tmp_path):
    rows = [{"instruction": "x", "response": ""}] * 3
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    assert_user_error(run(cli, tmp_path, path), "no usable rows left out of 3", "empty_response: 3")


def test_hub_dataset_unreachable(cli, tmp_path):
    assert_user_error(
        run(cli, tmp_path, "someone/some-dataset"),
        "'someone/some-dataset' is not a local file or folder, and loading it as a hub dataset failed",
    )


def test_tokenizer_of_missing_local_model(cli, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", dolly_rows(3))
    assert_user_error(
        run(cli, tmp_path, path, "dolly", f"model.name_or_path={tmp_path}/nomodel"),
        "nomodel does not exist",
    )
