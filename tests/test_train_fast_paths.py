"""`kubetune train` through the real CLI with the speed work on: bf16 QLoRA against the all-fp32
path, and the `auto` micro batch and checkpointing the worker takes from the memory plan."""

from __future__ import annotations

import json

import pytest

from kubetune.components.config import load_recipe
from kubetune.components.planner.architecture import architecture
from kubetune.components.planner.fit import MARGIN
from kubetune.components.planner.plan import GB, plan_for

from .conftest import TINY_DEMO

pytestmark = pytest.mark.integration


def train(cli, dataset, output, *sets):
    args = [a for s in sets for a in ("--set", s)]
    return cli("train", TINY_DEMO, "--dataset", dataset, "--output", output, *args)


def test_bf16_qlora_trains_within_2_percent_of_the_fp32_path(cli, tiny_dataset, tmp_path):
    """50 steps of QLoRA with the frozen weights and the LoRA math in bf16 (the compute dtype)
    against the same run in fp32 throughout: every step's loss within 2%."""
    runs = {}
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / dtype
        result = train(
            cli,
            tiny_dataset,
            out,
            "method=qlora",
            f"quant.compute_dtype={dtype}",
            "distributed.procs_per_node=1",
            "train.micro_batch_size=2",  # 50 steps of 2 rows: CI time
            "train.max_steps=50",
            "train.logging_steps=1",
        )
        assert result.code == 0, result
        runs[dtype] = json.loads((out / "metrics.json").read_text())
    bf16, fp32 = runs["bfloat16"], runs["float32"]
    assert set(bf16["precision"]["frozen"]) == {"bfloat16", "uint8"}  # no fp32 frozen copy
    assert set(bf16["precision"]["trainable"]) == {"float32"}  # LoRA master weights
    assert set(fp32["precision"]["frozen"]) == {"float32", "uint8"}
    assert bf16["kernels"]["lora"] == "fused"
    assert len(bf16["loss"]) == len(fp32["loss"]) == 50
    for (step, a), (_, b) in zip(bf16["loss"], fp32["loss"], strict=True):
        assert abs(a - b) <= 0.02 * b, (step, a, b)
    assert bf16["eval_loss"] == pytest.approx(fp32["eval_loss"], rel=0.02)


def peaks(sets: list[str], micro: int, layers: list[int]) -> list[float]:
    """The plan's peak bytes for the CPU worker (fp32 weights, one process)."""
    cfg = load_recipe(TINY_DEMO, sets)
    arch = architecture(cfg)
    return [plan_for(cfg, arch, 1, 4, micro, k).total for k in layers]


def gpu_between(low: float, high: float) -> str:
    """hardware.gpu_memory_gb whose budget (less the margin) lies between two peaks."""
    return f"hardware.gpu_memory_gb={(low + high) / 2 / (1 - MARGIN) / GB:.9f}"


def test_auto_checkpointing_and_micro_batch_follow_the_plan(cli, tiny_dataset, tmp_path):
    """A GPU whose memory lies between the plan's peak with one of the two decoder layers
    checkpointed and with none: auto checkpoints exactly one layer. Then a GPU between the
    peaks of micro batch 4 and 8: auto takes 4 and grad_accum 4 for a global batch of 16."""
    base = ["distributed.procs_per_node=1", "train.max_steps=3", "train.logging_steps=1"]
    none, one = peaks(base, 8, [0, 1])
    assert one < none
    out = tmp_path / "checkpointing"
    sets = [*base, "train.gradient_checkpointing=auto", gpu_between(one, none)]
    result = train(cli, tiny_dataset, out, *sets)
    assert result.code == 0, result
    metrics = json.loads((out / "metrics.json").read_text())
    chosen = metrics["gradient_checkpointing"]
    assert (chosen["setting"], chosen["layers"], chosen["of"]) == ("auto", 1, 2)
    assert "fewest" in chosen["reason"]
    assert chosen["planned_gb"] == pytest.approx(one / GB, abs=0.01)

    four, eight = peaks(base, 4, [0])[0], peaks(base, 8, [0])[0]
    out = tmp_path / "micro"
    sets = [
        *base,
        "train.gradient_checkpointing=false",
        "train.micro_batch_size=auto",
        "train.global_batch_size=16",
        gpu_between(four, eight),
    ]
    result = train(cli, tiny_dataset, out, *sets)
    assert result.code == 0, result
    assert "auto: micro batch 4 x grad_accum 4" in result.out
    metrics = json.loads((out / "metrics.json").read_text())
    micro = metrics["micro_batch"]
    assert (micro["setting"], micro["micro_batch_size"], micro["grad_accum"]) == ("auto", 4, 4)
    assert micro["global_batch_size"] == 16 and len(metrics["loss"]) == 3
    assert metrics["gradient_checkpointing"]["layers"] == 0
