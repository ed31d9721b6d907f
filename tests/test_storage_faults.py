"""Storage that fills up or refuses writes, produced for real: small tmpfs mounts (a full disk,
a read-only file system; mounting needs CAP_SYS_ADMIN, as root in CI's container), a file-size
limit (RLIMIT_FSIZE, anywhere), and output paths whose parent folder is missing. Every command
that writes must end in one line naming the path and the cause, exit 2, and leave nothing
that looks complete; a checkpoint whose save fails never replaces the last good one."""

from __future__ import annotations

import json
import resource
import shutil
import subprocess
import uuid
from contextlib import contextmanager
from pathlib import Path

import pytest

from .conftest import KUBETUNE, TINY_DEMO, CliResult, run_cli

pytestmark = pytest.mark.integration


def _mount(target: Path, options: str) -> bool:
    target.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)], capture_output=True
    )
    return done.returncode == 0


@contextmanager
def tmpfs(where: Path, size: str, read_only: bool = False):
    """A fresh tmpfs of `size` at `where` (skips the test where mounting is not allowed)."""
    options = f"size={size}" + (",ro" if read_only else "")
    if not shutil.which("mount") or not _mount(where, options):
        pytest.skip("cannot mount a tmpfs here (needs CAP_SYS_ADMIN)")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def resize(where: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(where)], check=True)


def fill(disk: Path) -> None:
    """Write a file until the disk is full."""
    try:
        with open(disk / "filler", "wb") as f:
            while True:
                f.write(b"x" * 4096)
                f.flush()
    except OSError:
        pass


def visible(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def assert_storage_error(result: CliResult, path: Path, cause: str) -> None:
    assert result.code == 2, result
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result
    assert str(path) in lines[0] and cause in lines[0], result
    assert "Traceback" not in result.err


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("model") / "tiny"
    assert run_cli("tiny", "falcon", "--output", out).code == 0
    return out


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny_model) -> Path:
    """A LoRA adapter of tiny://falcon made with peft itself (nothing trained)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("adapter") / "lora"
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    get_peft_model(model, LoraConfig(r=4, target_modules=["query_key_value"])).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def pushed(tmp_path_factory, tiny_model) -> Path:
    out = tmp_path_factory.mktemp("pushed") / "model"
    assert run_cli("push", tiny_model, out).code == 0
    return out


def writers(dataset: Path, adapter: Path, model: Path, pushed: Path) -> dict:
    """Every command that writes, as (args before the output, args after it)."""
    return {
        "prepare": (["prepare", TINY_DEMO, "--output"], []),
        "merge": (
            ["merge", TINY_DEMO, "--adapter", adapter, "--output"],
            ["--set", f"model.name_or_path={model}"],
        ),
        "evaluate": (
            ["evaluate", TINY_DEMO, "--model", model, "--dataset", dataset, "--output"],
            ["--set", "eval.num_prompts=2", "--set", "eval.max_new_tokens=4"],
        ),
        "push": (["push", model], []),
        "pull": (["pull", pushed], []),
        "compile": (["compile", TINY_DEMO, "--output"], []),
        "tiny": (["tiny", "falcon", "--output"], []),
        "train": (
            ["train", TINY_DEMO, "--dataset", dataset, "--output"],
            ["--set", "train.max_steps=2"],
        ),
    }


COMMANDS = ["prepare", "merge", "evaluate", "push", "pull", "compile", "tiny", "train"]
FULL_DISK = [c for c in COMMANDS if c != "train"]  # train's full disk: the checkpoint test


def output_name(command: str) -> str:
    return "pipeline.yaml" if command == "compile" else "out"


@pytest.fixture
def mountpoint(tmp_path) -> Path:
    return tmp_path / f"mnt-{uuid.uuid4().hex[:6]}"


@pytest.mark.parametrize("command", FULL_DISK)
def test_a_full_disk_is_one_line_and_leaves_nothing(
    command, tiny_dataset, adapter, tiny_model, pushed, mountpoint
):
    before, after = writers(tiny_dataset, adapter, tiny_model, pushed)[command]
    with tmpfs(mountpoint, "8k") as disk:
        out = disk / output_name(command)
        result = run_cli(*before, out, *after)
        assert_storage_error(result, out, "no space left on the device")
        if command == "push":  # a folder push: files may be there, never the manifest
            assert not (out / "manifest.json").exists()
            assert not [p for p in out.rglob(".*partial*")]
        else:
            assert visible(disk) == [], visible(disk)


@pytest.mark.parametrize("command", COMMANDS)
def test_a_read_only_path_is_one_line(
    command, tiny_dataset, adapter, tiny_model, pushed, mountpoint
):
    before, after = writers(tiny_dataset, adapter, tiny_model, pushed)[command]
    with tmpfs(mountpoint, "1m", read_only=True) as disk:
        out = disk / output_name(command)
        assert_storage_error(run_cli(*before, out, *after), out, "read-only")


@pytest.mark.parametrize("command", COMMANDS)
def test_a_missing_parent_folder_is_one_line(
    command, tiny_dataset, adapter, tiny_model, pushed, tmp_path
):
    before, after = writers(tiny_dataset, adapter, tiny_model, pushed)[command]
    out = tmp_path / "not-mounted" / output_name(command)
    result = run_cli(*before, out, *after)
    assert_storage_error(result, out, "does not exist")
    assert not (tmp_path / "not-mounted").exists()


def test_a_file_size_limit_stops_prepare_with_one_line(tmp_path):
    """RLIMIT_FSIZE (ulimit -f): works without mounting anything."""
    out = tmp_path / "data"

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    proc = subprocess.run(
        [KUBETUNE, "prepare", str(TINY_DEMO), "--output", str(out)],
        capture_output=True,
        text=True,
        preexec_fn=limit,
        timeout=300,
    )
    assert_storage_error(CliResult(proc), out, "file-size limit")
    assert visible(tmp_path) == []


def test_render_job_to_a_full_disk_is_one_line(tmp_path, mountpoint):
    with tmpfs(mountpoint, "64k") as disk:
        fill(disk)
        target = disk / "job.yaml"
        with open(target, "w") as stdout:
            proc = subprocess.run(
                [KUBETUNE, "render-job", "falcon-7b-qlora"],
                stdout=stdout,
                stderr=subprocess.PIPE,
                text=True,
                timeout=120,
            )
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.strip().splitlines() == [
            "error: standard output: no space left on the device"
        ]


def test_a_checkpoint_save_on_a_full_disk_keeps_the_last_good_one(tiny_dataset, mountpoint):
    """The disk fills while step 4's checkpoint is written (room for one, not two): the run
    stops with one line, step 2's checkpoint is intact; with space again the rerun resumes
    from step 2 and ends at the same step count as an uninterrupted run."""
    args = ["train", TINY_DEMO, "--dataset", tiny_dataset, "--output"]
    sets = ["--set", "train.max_steps=6", "--set", "train.save_steps=2"]
    with tmpfs(mountpoint, "1200k") as disk:
        out = disk / "run"
        failed = run_cli(*args, out, *sets)
        assert failed.code == 2 and "Traceback" not in failed.err, failed
        error = [line for line in failed.err.splitlines() if "error" in line.lower()]
        assert len(error) == 1 and "cannot save the checkpoint of step 4" in error[0], failed
        assert "no space left on the device" in error[0] and str(out) in error[0]
        assert visible(out / "checkpoints") == ["step-0000002"]
        assert not (out / "metrics.json").exists()
        resize(disk, "8m")
        again = run_cli(*args, out, *sets)
        assert again.code == 0, again
        assert "resuming from" in again.out and "step 2 of 6" in again.out
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["steps"] == 6 and metrics["resumed_from_step"] == 2
        assert [s for s, _ in metrics["loss"]] == list(range(1, 7))
