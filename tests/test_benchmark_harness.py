"""The GPU training benchmark's harness, run in its CPU smoke mode (no timing is asserted)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from .conftest import REPO

pytestmark = pytest.mark.integration


def test_train_throughput_smoke_runs_both_sides():
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "train_throughput.py"),
            "--smoke",
            "--models",
            "tiny-falcon",
            "--methods",
            "qlora",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| tiny-falcon")]
    assert len(rows) == 2
    ours = next(r for r in rows if "kubetune worker" in r)
    assert ours.rstrip(" |").endswith("| 8"), ours  # every Falcon linear layer is 4-bit


def test_train_throughput_without_a_gpu_says_so():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "train_throughput.py")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "needs a CUDA GPU" in proc.stderr
