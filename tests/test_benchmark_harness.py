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
            "--cases",
            "tiny-falcon-qlora",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| tiny-falcon")]
    assert len(rows) == 3  # both sides, then the ratios
    ours = next(r for r in rows if "kubetune worker" in r)
    assert ours.rstrip(" |").endswith("| 8"), ours  # every Falcon linear layer is 4-bit
    theirs = next(r for r in rows if "Trainer + peft" in r)
    losses = [float(r.split("|")[8]) for r in (ours, theirs)]  # the loss (last 5) column
    assert all(5.0 < loss < 8.0 for loss in losses), rows  # both trained the same task
    ratios = rows[-1].split("|")
    assert ratios[2].strip().endswith("x"), rows[-1]


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
