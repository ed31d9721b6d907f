"""The GPU training benchmark's harness, run in its CPU smoke mode (no timing is asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from .conftest import REPO

pytestmark = pytest.mark.integration


def test_train_throughput_smoke_runs_both_sides(tmp_path):
    """On what the GPU check has there: only the GPU image's distributions and the wheels
    benchmarks/gpu_check.sh carries are importable to the harness and the worker."""
    from .test_gpu_check import image_env

    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "train_throughput.py"),
            "--smoke",
            "--cases",
            "tiny-falcon-qlora",
            "--keep",
            str(tmp_path / "runs"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **image_env()},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    kept = sorted(p.name for p in (tmp_path / "runs").iterdir())  # for fit_speed_model --add-run
    assert kept == [
        "kubetune-tiny-falcon-qlora-2.metrics.json",
        "kubetune-tiny-falcon-qlora-auto.metrics.json",
    ]
    first = next(line for line in proc.stdout.splitlines() if line.startswith("{"))
    machine = json.loads(first)["machine"]
    assert machine["versions"]["torch"] and machine["versions"]["bitsandbytes"]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| tiny-falcon")]
    assert len(rows) == 5  # Trainer, kubetune, kubetune with micro batch auto, two ratios
    sides = rows[:3]
    assert "Trainer + peft" in sides[0] and "kubetune worker" in sides[1] and "auto" in sides[2]
    for side in sides:  # every Falcon linear layer is 4-bit on both sides (FalconLinear too)
        assert side.rstrip(" |").endswith("| 8"), side
    losses = [float(r.split("|")[11]) for r in sides]  # the loss (last 5) column
    assert all(5.0 < loss < 8.0 for loss in losses), rows  # all trained the same task
    for side in sides:  # real and computed tokens/s, examples/s and rows/s are all there
        assert all(float(c.replace(",", "")) > 0 for c in side.split("|")[4:9] if c.strip() != "-")
    assert rows[3].split("|")[3].strip().endswith("x"), rows[3]
    case = json.loads(next(line for line in proc.stdout.splitlines() if '"case"' in line))
    assert case["kubetune_auto"]["micro_batch"]["setting"] == "auto"


def test_train_throughput_smoke_runs_the_dpo_case_against_trl(tmp_path):
    """The DPO case: kubetune's dpo objective and TRL's DPOTrainer on the same generated pairs,
    with only the GPU image's distributions and the carried wheels (trl among them)."""
    from .test_gpu_check import image_env

    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "train_throughput.py"), "--smoke", "--cases",
         "tiny-llama-dpo-lora"],
        capture_output=True, text=True, timeout=600, env={**os.environ, **image_env()},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| tiny-llama-dpo")]
    assert len(rows) == 3 and "TRL DPOTrainer" in rows[0] and "kubetune worker" in rows[1]
    losses = [float(r.split("|")[11]) for r in rows[:2]]
    assert all(0.6 < loss < 0.8 for loss in losses), rows  # DPO's log 2 at the start
    case = json.loads(next(line for line in proc.stdout.splitlines() if '"case"' in line))
    assert case["kubetune"]["objective"] == "dpo" and case["kubetune"]["reference"] == "live"


def test_the_harness_refuses_a_qlora_side_that_is_not_4_bit():
    from benchmarks.train_throughput import SMOKE_CASES, check_quantized

    case = next(c for c in SMOKE_CASES if c.method == "qlora")
    assert (
        check_quantized(case, "Trainer", {"quantized_linear_modules": 8, "linear_layers": 8})
        is None
    )
    why = check_quantized(case, "Trainer", {"quantized_linear_modules": 0, "linear_layers": 8})
    assert why == "tiny-falcon-qlora: Trainer has 0 4-bit layers of 8 linear layers"


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


def test_eval_generate_smoke_runs_the_hf_engine_and_says_what_did_not_run():
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "eval_generate.py"), "--smoke"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    # the JSON lines (a library may log to stdout between them, as DeepSpeed's probe does)
    records = [json.loads(line) for line in lines if line.startswith("{")]
    assert records[0]["machine"]["versions"]["transformers"]
    hf = records[1]
    assert hf["engine"] == "hf, batch 8" and hf["seconds"] > 0
    assert 0 < hf["tokens"] <= 16 * 16  # at most max_new_tokens per prompt, EOS cut
    (row,) = [line for line in lines if line.startswith("| hf, batch 8 |")]
    assert float(row.split("|")[3]) == pytest.approx(16 / hf["seconds"], rel=0.01)
    assert "| vllm | not run here" in proc.stdout
