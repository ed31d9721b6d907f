"""Faults inside training (docs/reliability.md), each produced for real through `kubetune train`
with 2 torchrun workers on gloo: a SIGTERM to one worker (preemption), a NaN from a learning
rate and from a poisoned batch, a loss spike, an injected CUDA out-of-memory error, a rank that
stops (SIGSTOP) inside a collective, and a flipped byte in a checkpoint."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import DatasetDict, load_from_disk
from safetensors.torch import load_file, save_file

from kubetune.components.models import resolve_model

from .conftest import assert_user_error, run_cli
from .test_train import rank_processes, train_cmd

pytestmark = pytest.mark.integration

POISON = 1000  # a token id the tiny demo's data never uses (checked below)
MICRO, RANKS = 8, 2  # tiny-demo.yaml's micro batch, and its processes


def train(dataset, out, *sets, env=None):
    return run_cli(*train_cmd(dataset, out, *sets)[1:], env=env)


def losses(out: Path) -> list:
    return json.loads((out / "metrics.json").read_text())["loss"]


def step_rows(step: int, rank: int, n_rows: int, seed: int = 42) -> list[int]:
    """The train rows of `rank` at optimizer step `step` (grad_accum 1), as the data order is
    documented (train/data.py): a permutation per epoch from PCG64([seed, epoch]), dealt to the
    ranks in turn, in micro batches. Written out here, not imported."""
    per_epoch = (n_rows // RANKS) // MICRO
    epoch, j = divmod(step - 1, per_epoch)
    order = np.random.Generator(np.random.PCG64([seed, epoch])).permutation(n_rows)[rank::RANKS]
    return [int(r) for r in order[j * MICRO : (j + 1) * MICRO]]


def sha256sum_check(folder: Path) -> bool:
    """coreutils' own check of a checkpoint's SHA256SUMS."""
    return subprocess.run(["sha256sum", "-c", "--quiet", "SHA256SUMS"], cwd=folder).returncode == 0


@pytest.fixture(scope="module")
def baseline(tiny_dataset, tmp_path_factory) -> list:
    """An uninterrupted 12-step run's losses."""
    out = tmp_path_factory.mktemp("baseline") / "run"
    result = train(tiny_dataset, out, "train.max_steps=12", "train.logging_steps=1")
    assert result.code == 0, result
    return losses(out)


def wait_for_step(proc, out: Path, step: int) -> None:
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if progress(proc) >= step:
            return
        time.sleep(0.05)
    raise AssertionError("the run never reached the step")


def progress(proc) -> int:
    """The last `step N/M` line on the run's stdout so far (read without blocking)."""
    import select

    while select.select([proc.stdout], [], [], 0)[0]:
        line = proc.stdout.readline()
        if not line:
            break
        proc.lines.append(line)
        if line.startswith("step ") and "/" in line.split()[1]:
            proc.step = int(line.split()[1].split("/")[0])
    return proc.step


def start(cmd, env=None):
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1,
        env={**os.environ, **(env or {})},
    )  # fmt: skip
    proc.lines, proc.step = [], 0
    return proc


def finish(proc) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=300)
    return proc.returncode, "".join(proc.lines) + out, err


def test_sigterm_to_one_worker_saves_exits_preempted_and_the_rerun_matches(
    tiny_dataset, baseline, tmp_path
):
    """A real SIGTERM (twice) to rank 1 only, as a drained node's kubelet sends: every rank
    finishes the step, one checkpoint is saved, the launcher exits 143 (preempted); the rerun
    resumes there and its losses equal the uninterrupted run's."""
    out = tmp_path / "run"
    cmd = train_cmd(tiny_dataset, out, "train.max_steps=12", "train.logging_steps=1")
    proc = start(cmd)
    wait_for_step(proc, out, 3)
    rank1 = rank_processes(proc.pid)["kubetune-rank1"]
    os.kill(rank1, signal.SIGTERM)
    time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):  # it may have saved and exited already
        os.kill(rank1, signal.SIGTERM)  # a second notice changes nothing
    code, stdout, stderr = finish(proc)
    assert code == 143, (stdout, stderr)
    assert "Traceback" not in stderr, stderr
    saved = sorted((out / "checkpoints").glob("step-*"))
    assert len(saved) == 1 and sha256sum_check(saved[0]), saved
    step = int(saved[0].name.split("-")[1])
    assert 3 <= step < 12 and not (out / "metrics.json").exists()
    assert f"preempted (SIGTERM) at step {step} of 12" in stdout, stdout
    again = train(tiny_dataset, out, "train.max_steps=12", "train.logging_steps=1")
    assert again.code == 0, again
    assert f"resuming from {saved[0]}" in again.out
    assert losses(out) == baseline


def test_sigkill_right_after_sigterm_leaves_a_good_checkpoint(tiny_dataset, baseline, tmp_path):
    """The grace running out: SIGTERM to every rank, then SIGKILL to the whole run a moment
    later, wherever the save then is. The newest complete checkpoint passes its checksums and
    the rerun ends with the uninterrupted run's losses."""
    out = tmp_path / "run"
    cmd = train_cmd(
        tiny_dataset, out, "train.max_steps=12", "train.logging_steps=1", "train.save_steps=2"
    )
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 240
    while len(list((out / "checkpoints").glob("step-*"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    ranks = rank_processes(proc.pid)
    for pid in ranks.values():
        os.kill(pid, signal.SIGTERM)
    time.sleep(0.15)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    for folder in (out / "checkpoints").glob("step-*"):
        assert sha256sum_check(folder), folder
    again = train(tiny_dataset, out, "train.max_steps=12", "train.logging_steps=1")
    assert again.code == 0, again
    assert losses(out) == baseline


def test_a_nan_from_the_learning_rate_stops_with_one_line(tiny_dataset, tmp_path):
    """The issue's run: train.lr=1e12 went on with `loss nan` to the end and wrote NaN into
    metrics.json. Now step 2's NaN stops every rank with one line; step 1's checkpoint stays."""
    out = tmp_path / "run"
    result = train(tiny_dataset, out, "train.lr=1e12", "train.max_steps=20", "train.save_steps=1")
    assert_user_error(result, "step 2: the loss is nan on rank", "train.lr=1e+12", "rows ")
    assert "the last good checkpoint step-0000001 is kept" in result.err
    assert [p.name for p in (out / "checkpoints").glob("step-*")] == ["step-0000001"]
    assert not (out / "metrics.json").exists() and not (out / "adapter_model.safetensors").exists()


@pytest.fixture(scope="module")
def poisoned(tiny_dataset, tmp_path_factory):
    """A copy of the tiny Falcon whose input embedding of token POISON is NaN (its output
    embedding untied and left finite), and of the prepared data with POISON written into train
    rows 10 and 20."""
    root = tmp_path_factory.mktemp("poisoned")
    model = root / "model"
    shutil.copytree(resolve_model("tiny://falcon"), model)
    weights = model / "model.safetensors"
    tensors = load_file(weights)
    (name,) = [k for k in tensors if k.endswith("word_embeddings.weight")]
    data = load_from_disk(str(tiny_dataset))
    used = {t for split in data.values() for row in split["input_ids"] for t in row}
    assert POISON not in used and tensors[name].shape[0] > POISON
    tensors["lm_head.weight"] = tensors[name].clone()
    tensors[name][POISON] = float("nan")
    save_file(tensors, weights, metadata={"format": "pt"})
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))

    def poison(row, index):
        if index in (10, 20):
            row["input_ids"] = [*row["input_ids"][:5], POISON, *row["input_ids"][6:]]
        return row

    dataset = root / "dataset"
    train_split = data["train"].map(poison, with_indices=True)
    DatasetDict({"train": train_split, "eval": data["eval"]}).save_to_disk(str(dataset))
    shutil.copy(tiny_dataset / "stats.json", dataset / "stats.json")
    return model, dataset, len(train_split)


def test_a_poisoned_batch_is_skipped_on_every_rank(poisoned, tmp_path):
    model, dataset, n_rows = poisoned
    out = tmp_path / "run"
    result = train(
        dataset, out, f"model.name_or_path={model}", "train.nonfinite=skip", "train.max_steps=20",
        "train.logging_steps=1",
    )  # fmt: skip
    assert result.code == 0, result
    expected = sorted(
        {s for s in range(1, 21) for r in range(RANKS) if {10, 20} & set(step_rows(s, r, n_rows))}
    )
    assert expected, "the poisoned rows fall into some step"
    record = losses(out)
    assert [s for s, loss in record if loss is None] == expected
    assert all(loss is not None for s, loss in record if s not in expected)
    skipped = [line for line in result.out.splitlines() if " skipped (rank " in line]
    assert len(skipped) == len(expected)
    for line in skipped:
        assert "rows " in line and (" 10" in line or " 20" in line), line
    adapter = load_file(out / "adapter_model.safetensors")
    assert all(bool(torch.isfinite(t).all()) for t in adapter.values())
    assert json.loads((out / "metrics.json").read_text())["eval_loss"] is not None


def test_a_poisoned_batch_under_stop_names_its_rows(poisoned, tmp_path):
    model, dataset, n_rows = poisoned
    first = next(
        (s, r)
        for s in range(1, 21)
        for r in range(RANKS)
        if {10, 20} & set(step_rows(s, r, n_rows))
    )
    result = train(dataset, tmp_path / "run", f"model.name_or_path={model}", "train.max_steps=20")
    rows = ", ".join(map(str, step_rows(*first, n_rows)))
    assert_user_error(
        result,
        f"step {first[0]}: the loss is nan on rank {first[1]}",
        f"rows {rows} of the prepared",
    )


def test_a_loss_spike_rolls_back_and_skips_its_batch(tiny_dataset, tmp_path):
    """Every row of step 14's batches gets labels of a token the data never has: a real spike of
    that step's loss. The guard logs it, goes back to step 12's checkpoint and skips step 14's
    batches; with action log it only says so."""
    data = load_from_disk(str(tiny_dataset))
    n_rows = len(data["train"])
    bad = {row for rank in range(RANKS) for row in step_rows(14, rank, n_rows)}

    def spoil(row, index):
        if index in bad:
            row["labels"] = [POISON if label != -100 else label for label in row["labels"]]
        return row

    dataset = tmp_path / "dataset"
    DatasetDict({"train": data["train"].map(spoil, with_indices=True), "eval": data["eval"]}
                ).save_to_disk(str(dataset))  # fmt: skip
    shutil.copy(tiny_dataset / "stats.json", dataset / "stats.json")
    sets = ("train.max_steps=16", "train.save_steps=2", "train.logging_steps=1",
            "train.spike_guard.window=5", "train.spike_guard.z=4")  # fmt: skip
    logged = train(dataset, tmp_path / "logged", *sets)
    assert logged.code == 0, logged
    assert "step 14: loss spike" in logged.out and "rolled back" not in logged.out
    out = tmp_path / "rolled"
    result = train(dataset, out, *sets, "train.spike_guard.action=rollback")
    assert result.code == 0, result
    assert "step 14: loss spike" in result.out
    assert "step 14: rolled back to step 12; its batch is skipped" in result.out
    record = dict((s, loss) for s, loss in losses(out))
    assert sorted(record) == list(range(1, 17)) and record[14] is None
    assert all(record[s] is not None for s in record if s != 14)
    trained = dict((s, loss) for s, loss in losses(tmp_path / "logged"))
    assert [record[s] for s in range(1, 14)] == [trained[s] for s in range(1, 14)]
    state = json.loads((out / "checkpoints" / "step-0000014" / "trainer_state.json").read_text())
    assert state["skipped"] == [[14, "loss spike"]]


SITE = """
import os
import torch
from kubetune.components.train import loop

_step = loop.Loop._step


def _step_or_oom(self, batches, done):
    if os.environ.get("RANK") == "1" and done == 3:
        raise torch.OutOfMemoryError(
            "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 1 has a total capacity of "
            "79.19 GiB of which 1.05 GiB is free."
        )
    return _step(self, batches, done)


loop.Loop._step = _step_or_oom
"""


def test_an_out_of_memory_error_on_one_rank_ends_every_rank_with_the_plans_advice(
    tiny_dataset, tmp_path
):
    """torch.OutOfMemoryError raised on rank 1 at step 3 (a sitecustomize module patches the
    loop's step in every worker: the error a CUDA allocator raises, on the CPU)."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITE)
    env = {"PYTHONPATH": f"{site}:{os.environ.get('PYTHONPATH', '')}"}
    started = time.monotonic()
    result = train(
        tiny_dataset, tmp_path / "run", "train.max_steps=20", "hardware.gpu=A10G-24GB",
        "train.micro_batch_size=8", env=env,
    )  # fmt: skip
    assert_user_error(
        result,
        "step 3: rank 1 ran out of GPU memory (it tried to allocate 2.00 GiB)",
        "the plan predicted",
        "per GPU for micro batch 8",
        "Settings the plan fits: train.micro_batch_size=4 (",
        "train.gradient_checkpointing=true (",
        "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True",
    )
    assert result.err.count("error: ") == 1, result
    assert time.monotonic() - started < 120


def test_a_rank_that_stops_answering_is_named_within_the_timeout(tiny_dataset, tmp_path):
    """SIGSTOP to rank 1 mid-run: rank 0 waits in a collective; within
    distributed.timeout_minutes (6 s here) it stops with one line naming step and rank 1."""
    out = tmp_path / "run"
    cmd = train_cmd(
        tiny_dataset, out, "train.max_steps=200", "train.logging_steps=1",
        "distributed.timeout_minutes=0.1",
    )  # fmt: skip
    proc = start(cmd, env={"TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "3"})
    wait_for_step(proc, out, 3)
    rank1 = rank_processes(proc.pid)["kubetune-rank1"]
    os.kill(rank1, signal.SIGSTOP)
    stopped = time.monotonic()
    code, stdout, stderr = finish(proc)
    assert time.monotonic() - stopped < 60, "not within the timeout"
    assert code == 2, (stdout, stderr)
    assert "Traceback" not in stderr, stderr
    assert "distributed.timeout_minutes=0.1" in stderr, stderr
    assert "rank 1 did not arrive" in stderr and "of step " in stderr, stderr


def test_a_flipped_byte_falls_back_to_the_checkpoint_before(tiny_dataset, baseline, tmp_path):
    """A checkpoint complete on disk but with one byte flipped in rank 1's tensors (which
    safetensors would load without a word): the resume says so, sets it aside, resumes from
    the one before, and ends with the uninterrupted run's losses. keep_checkpoints=3 keeps 3."""
    out = tmp_path / "run"
    sets = ("train.max_steps=12", "train.logging_steps=1", "train.save_steps=1",
            "train.keep_checkpoints=3")  # fmt: skip
    first = train(tiny_dataset, out, *sets)
    assert first.code == 0, first
    kept = sorted(p.name for p in (out / "checkpoints").glob("step-*"))
    assert kept == ["step-0000009", "step-0000010", "step-0000011"]  # not the last step
    assert all(sha256sum_check(out / "checkpoints" / k) for k in kept)
    (out / "metrics.json").unlink()  # as if the final save had failed: the rerun resumes
    shard = out / "checkpoints" / "step-0000011" / "rank-00001.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[-3] ^= 0x01  # inside the tensor data: the file still parses
    shard.write_bytes(bytes(raw))
    assert hashlib.sha256(raw).hexdigest() not in (shard.parent / "SHA256SUMS").read_text()
    again = train(tiny_dataset, out, *sets)
    assert again.code == 0, again
    assert (
        "rank 1: " in again.out and "rank-00001.safetensors does not match its SHA-256" in again.out
    )
    assert "failed its checksums on rank(s) 1: moved aside to .step-0000011.corrupt" in again.out
    assert f"resuming from {out / 'checkpoints' / 'step-0000010'}" in again.out
    assert losses(out) == baseline
    assert not list((out / "checkpoints").glob(".step-*.corrupt"))  # gone with the next save
