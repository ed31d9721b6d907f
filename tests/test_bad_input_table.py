"""Every command answers bad input with exit 2 and one line naming the problem and where: no
traceback, and no output left behind that looks complete. One row per case, through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .conftest import TINY_DEMO, assert_user_error


def write_inputs(tmp: Path) -> None:
    """The inputs the table refers to, written into tmp."""
    (tmp / "empty").mkdir()
    (tmp / "file.json").write_text("{}")
    (tmp / "bad.yaml").write_text("model: [\n")
    (tmp / "list.yaml").write_text("- a\n- b\n")
    (tmp / "bad.parquet").write_bytes(b"PAR1 not really")
    (tmp / "wizard.jsonl").write_text(
        json.dumps({"messages": [{"role": "wizard", "content": "hi"}]}) + "\n"
    )
    (tmp / "no-answer.jsonl").write_text(
        json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n"
    )


R = str(TINY_DEMO)
# (command line with {tmp} for the test's folder, fragments of the error, output that must not exist)
CASES = [
    ("train {R} --dataset {tmp}/empty --output {tmp}/out", ["empty: not a finished"], "out"),
    ("train {R} --dataset {tmp}/file.json --output {tmp}/out", ["not a finished"], "out"),
    ("train {R} --dataset {tmp}/nothing --output {tmp}/out", ["nothing"], "out"),
    ("merge {R} --adapter {tmp}/empty --output {tmp}/out", ["not a LoRA adapter"], "out"),
    ("merge {R} --adapter {tmp}/file.json --output {tmp}/out", ["not a LoRA adapter"], "out"),
    (
        "evaluate {R} --model {tmp}/empty --dataset {tmp}/empty --output {tmp}/out",
        ["empty: not a `kubetune prepare` output"],
        "out",
    ),
    ("push {tmp}/empty {tmp}/out", ["nothing to push"], "out"),
    ("push {tmp}/nothing {tmp}/out", ["nothing: no such folder"], "out"),
    ("pull {tmp}/empty {tmp}/out", ["no manifest.json"], "out"),
    ("pull {tmp}/nothing {tmp}/out", ["no manifest.json"], "out"),
    (
        "fetch-model {R} --set model.name_or_path=s3:///m --workspace {tmp}/ws",
        ["s3:///m: an S3 URI needs a bucket"],
        "ws",
    ),
    (
        "prepare {R} --output {tmp}/out --set model.local_dir={tmp}/empty",
        ["model.local_dir", "no config.json"],
        "out",
    ),
    ("config {R} --set foo", ["--set foo: expected key=value"], None),
    ("config {R} --set =3", ["--set =3: expected key=value"], None),
    ("plan {R} --set train.lr=abc", ["--set train.lr=abc: train.lr"], None),
    ("config {tmp}/bad.yaml", ["bad.yaml:2: invalid YAML"], None),
    ("config {tmp}/list.yaml", ["a recipe is a YAML mapping"], None),
    ("config {tmp}/nothing.yaml", ["no such recipe file"], None),
    (
        "render-job {R} --set distributed.backend=pytorchjob --dataset rel/path",
        ["--dataset rel/path", "inside the pods"],
        None,
    ),
    ("compile {R} --output {tmp}/out.yaml --set data.colour=red", ["data.colour"], "out.yaml"),
    (
        "prepare {R} --output {tmp}/out --set data.path={tmp}/bad.parquet",
        ["bad.parquet: cannot read Parquet"],
        "out",
    ),
    (
        "prepare {R} --output {tmp}/out --set data.path={tmp}/wizard.jsonl --set data.format=chat",
        ["wizard.jsonl:1:", "role must be system, user or assistant"],
        "out",
    ),
    (
        "prepare {R} --output {tmp}/out --set data.path={tmp}/no-answer.jsonl "
        "--set data.format=chat",
        ["no-answer.jsonl:1:", "no assistant message"],
        "out",
    ),
    ("run {R} --local --set train.lr=-1 --workspace {tmp}/out", ["train.lr must be > 0"], "out"),
]


@pytest.mark.parametrize("line, fragments, output", CASES, ids=[c[0].split(" {")[0] for c in CASES])
def test_bad_input_is_one_clear_line(cli, tmp_path, line, fragments, output):
    write_inputs(tmp_path)
    args = line.format(R=R, tmp=tmp_path).split()
    result = cli(*args)
    assert_user_error(result, *fragments)
    assert len([x for x in result.err.strip().splitlines() if x.strip()]) <= 2, result
    if output:
        assert not (tmp_path / output).exists(), output
