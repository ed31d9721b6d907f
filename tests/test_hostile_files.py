"""Hostile or damaged files, made for real (sparse files stand in for hundreds of MB without
using the disk): each is refused with one line naming the file, before anything allocates
what the file claims; the peak memory of the refusing process is measured."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import KUBETUNE, TINY_DEMO, CliResult, assert_user_error, run_cli

pytestmark = pytest.mark.integration

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def tiny_copy(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny") / "falcon"
    assert run_cli("tiny", "falcon", "--output", out).code == 0
    return out


def copy_of(tiny_copy: Path, dest: Path) -> Path:
    shutil.copytree(tiny_copy, dest)
    return dest


def prepare_with(model: Path, out: Path, *sets: str) -> CliResult:
    overrides = [a for s in (f"model.name_or_path={model}", *sets) for a in ("--set", s)]
    return run_cli("prepare", TINY_DEMO, "--output", out, *overrides)


MEASURE = (
    "import resource, subprocess, sys\n"
    "code = subprocess.call(sys.argv[2:])\n"
    "open(sys.argv[1], 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))\n"
    "sys.exit(code)\n"
)


def peak_rss_of(cmd: list[str], tmp_path: Path) -> tuple[CliResult, int]:
    """Run cmd under a fresh parent that reports the peak resident memory of cmd (and its
    children) alone; the result and that peak in bytes (ru_maxrss is KiB on Linux)."""
    report = tmp_path / "maxrss"
    proc = subprocess.run(
        [sys.executable, "-c", MEASURE, str(report), *cmd],
        capture_output=True,
        text=True,
        timeout=300,
    )
    return CliResult(proc), int(report.read_text()) * 1024


def test_a_safetensors_header_claiming_an_absurd_size_is_refused(tiny_copy, tmp_path):
    model = copy_of(tiny_copy, tmp_path / "model")
    weights = model / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(struct.pack("<Q", 1 << 40) + data[8:])  # "a 1 TiB header"
    result = prepare_with(model, tmp_path / "out")
    assert_user_error(result, str(weights), "header claims 1,099,511,627,776 bytes")
    assert not (tmp_path / "out").exists()

    # a header that fits but puts a tensor past the end of the file
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    name = next(k for k in header if k != "__metadata__")
    header[name]["data_offsets"] = [0, 1 << 40]
    raw = json.dumps(header).encode()
    weights.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + length :])
    result = run_cli("merge", TINY_DEMO, "--adapter", model, "--output", tmp_path / "merged")
    assert_user_error(result, str(weights), f"tensor {name!r} claims bytes 0..{1 << 40}")


def test_a_symlink_out_of_the_model_folder_is_refused(tiny_copy, tmp_path):
    model = copy_of(tiny_copy, tmp_path / "model")
    secret = tmp_path / "outside.json"
    secret.write_text('{"not": "the model\'s"}')
    (model / "extra.json").symlink_to(secret)
    result = prepare_with(model, tmp_path / "out")
    assert_user_error(result, str(model / "extra.json"), "outside the model folder")
    pushed = run_cli("push", model, tmp_path / "pushed")
    assert_user_error(pushed, str(model / "extra.json"), "outside the model folder")
    assert not (tmp_path / "pushed").exists()
    # a link inside the folder is fine
    (model / "extra.json").unlink()
    (model / "extra.json").symlink_to(model / "config.json")
    assert prepare_with(model, tmp_path / "out").code == 0


def test_a_tokenizer_of_hundreds_of_mb_is_refused_by_its_size(tiny_copy, tmp_path):
    model = copy_of(tiny_copy, tmp_path / "model")
    with open(model / "tokenizer.json", "r+b") as f:
        f.truncate(400 * MiB)  # sparse: no disk used
    result, rss = peak_rss_of(
        [KUBETUNE, "prepare", str(TINY_DEMO), "--output", str(tmp_path / "out"),
         "--set", f"model.name_or_path={model}"],
        tmp_path,
    )  # fmt: skip
    assert_user_error(result, str(model / "tokenizer.json"), "over the 128 MiB bound")
    assert rss < 300 * MiB, rss


def test_a_dataset_row_of_hundreds_of_mb_on_one_line_is_refused_with_bounded_memory(tmp_path):
    data = tmp_path / "rows.jsonl"
    first = json.dumps({"dialogue": "A: hi\nB: hello", "summary": "They greet."}) + "\n"
    with open(data, "wb") as f:
        f.write(first.encode() + b'{"dialogue": "')
        f.truncate(512 * MiB)  # one line of 512 MB, no line end
    for workers in ("1", "2"):  # one process, and the JSON Lines batches handed to workers
        result, rss = peak_rss_of(
            [KUBETUNE, "prepare", str(TINY_DEMO), "--output", str(tmp_path / "out"),
             "--set", f"data.path={data}", "--set", "data.format=samsum",
             "--set", f"data.num_proc={workers}"],
            tmp_path,
        )  # fmt: skip
        assert_user_error(result, f"{data}:2", "a row of more than 64 MiB")
        assert rss < 400 * MiB, rss
        assert not (tmp_path / "out").exists()
    assert os.stat(data).st_blocks * 512 < 1 * MiB  # the test itself used no disk
