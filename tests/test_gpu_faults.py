"""The CUDA parts of the training fault handling (run with `python -m pytest -m gpu` on a CUDA
machine; skipped elsewhere): a real allocator out-of-memory error through `kubetune train`, and
an NCCL collective whose peer stops (two GPUs or more)."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
import torch

from .conftest import KUBETUNE, TINY_DEMO, assert_user_error, run_cli, run_prepare
from .test_train import rank_processes

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

# Every worker's allocator may use 0.5% of the GPU (about 400 MB of an H100): the tiny Llama's
# weights fit, a micro batch of 64 rows of 512 tokens' activations do not. A real OOM, not a
# raised one.
SITE = """
import torch
if torch.cuda.is_available():
    torch.cuda.set_per_process_memory_fraction(0.005, 0)
"""


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-faults") / "dataset"
    assert run_prepare(out, "model.name_or_path=tiny://llama").code == 0
    return out


def test_a_real_cuda_out_of_memory_error_is_one_line_with_the_plans_advice(dataset, tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITE)
    env = {"PYTHONPATH": f"{site}:{os.environ.get('PYTHONPATH', '')}"}
    sets = ["model.name_or_path=tiny://llama", "distributed.procs_per_node=1",
            "train.max_steps=5", "train.micro_batch_size=64", "train.gradient_checkpointing=false",
            "train.compile=false"]  # fmt: skip
    result = run_cli(
        "train", TINY_DEMO, "--dataset", dataset, "--output", tmp_path / "run",
        *[a for s in sets for a in ("--set", s)], env=env,
    )  # fmt: skip
    assert_user_error(
        result, "rank 0 ran out of GPU memory (", "GB allocated by tensors", "the plan predicted",
        "Settings the plan fits: train.micro_batch_size=32 (",
    )  # fmt: skip


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs (NCCL)")
def test_an_nccl_peer_that_stops_is_named_within_the_timeout(dataset, tmp_path):
    out = tmp_path / "run"
    cmd = [KUBETUNE, "train", str(TINY_DEMO), "--dataset", str(dataset), "--output", str(out),
           "--set", "model.name_or_path=tiny://llama", "--set", "distributed.procs_per_node=2",
           "--set", "train.max_steps=2000", "--set", "distributed.timeout_minutes=0.25"]  # fmt: skip
    env = {**os.environ, "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "3"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 300
    while not (out / "tensorboard").is_dir() and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(5)
    os.kill(rank_processes(proc.pid)["kubetune-rank1"], signal.SIGSTOP)
    stopped = time.monotonic()
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 2, (stdout, stderr)
    assert "rank 1 did not arrive" in stderr and "distributed.timeout_minutes=0.25" in stderr
    assert time.monotonic() - stopped < 120
