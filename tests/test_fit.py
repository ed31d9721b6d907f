"""`auto` gradient checkpointing and micro batch against the memory plan, partial
checkpointing against a model that keeps every activation, and the compile fallback."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from kubetune.components.architectures import decoder_layers
from kubetune.components.config import load_recipe
from kubetune.components.errors import UserError
from kubetune.components.models import resolve_model
from kubetune.components.planner.architecture import architecture
from kubetune.components.planner.fit import MARGIN
from kubetune.components.planner.plan import estimate, plan_for
from kubetune.components.train.kernels import compile_layers
from kubetune.components.train.modeling import apply_checkpointing, checkpointed_layers

from .conftest import RECIPES, TINY_DEMO

FALCON_7B = RECIPES / "falcon-7b-qlora.yaml"


def recipe(path, *sets):
    return load_recipe(path, list(sets))


_ARCHITECTURES: dict = {}


def peak(cfg, micro: int, checkpointed: int, gpus: int = 1) -> float:
    """The plan's peak for one choice, computed apart from the choosing code."""
    key = (cfg.model.name_or_path, cfg.method, cfg.lora.r)
    if key not in _ARCHITECTURES:  # a meta-device build of a 7B-40B model takes seconds
        _ARCHITECTURES[key] = architecture(cfg)
    return plan_for(cfg, _ARCHITECTURES[key], gpus, 2, micro, checkpointed).total


def budget(cfg) -> float:
    return estimate(cfg, gpus=1).gpu_memory * (1 - MARGIN)


@pytest.mark.parametrize(
    "path, sets",
    [
        # Falcon-7B QLoRA at 4 x 512 on an H100: about 17 GB without recomputation
        (FALCON_7B, ("train.micro_batch_size=4", "data.max_seq_len=512", "hardware.gpu=H100-80GB")),
        # the same on a 24 GB card at 2048 tokens: only some layers fit without recomputation
        (
            FALCON_7B,
            ("train.micro_batch_size=2", "data.max_seq_len=2048", "hardware.gpu=A10G-24GB"),
        ),
        (
            FALCON_7B,
            (
                "model.name_or_path=meta-llama/Meta-Llama-3-8B",
                "method=lora",
                "train.micro_batch_size=2",
                "data.max_seq_len=2048",
                "hardware.gpu=A100-40GB",
            ),
        ),
        (
            FALCON_7B,
            (
                "model.name_or_path=tiiuae/falcon-40b",
                "train.micro_batch_size=4",
                "data.max_seq_len=2048",
                "hardware.gpu=A100-80GB",
            ),
        ),
    ],
    ids=["falcon7b-h100", "falcon7b-a10g", "llama3-8b-lora-a100-40", "falcon40b-a100-80"],
)
def test_auto_checkpointing_takes_the_fewest_layers_that_fit(path, sets):
    cfg = recipe(path, *sets, "distributed.procs_per_node=1", "train.gradient_checkpointing=auto")
    plan = estimate(cfg, gpus=1)
    fit, layers, room = plan.fit, plan.arch.layers, budget(cfg)
    k = fit.checkpointed_layers
    assert fit.layers == layers and 0 <= k <= layers
    if peak(cfg, fit.micro_batch_size, layers) > room:  # nothing fits: every layer, said so
        assert k == layers and "does not fit" in fit.checkpointing_reason
    else:
        assert peak(cfg, fit.micro_batch_size, k) <= room
        assert k == 0 or peak(cfg, fit.micro_batch_size, k - 1) > room
    assert plan.total == pytest.approx(peak(cfg, fit.micro_batch_size, k))
    assert plan.as_dict()["gradient_checkpointing"]["layers"] == k


def test_the_four_choices_differ_as_their_memory_says():
    """The cases above land on off, some layers, and every layer: auto is not one answer."""
    off = estimate(
        recipe(
            FALCON_7B,
            "train.micro_batch_size=4",
            "data.max_seq_len=512",
            "hardware.gpu=H100-80GB",
            "distributed.procs_per_node=1",
        ),
        gpus=1,
    )
    some = estimate(
        recipe(
            FALCON_7B,
            "train.micro_batch_size=2",
            "data.max_seq_len=2048",
            "hardware.gpu=A10G-24GB",
            "distributed.procs_per_node=1",
        ),
        gpus=1,
    )
    assert (
        off.fit.checkpointed_layers == 0 and "without recomputation" in off.fit.checkpointing_reason
    )
    assert 0 < some.fit.checkpointed_layers < some.arch.layers


@pytest.mark.parametrize("gpu", ["H100-80GB", "A10G-24GB", "L4-24GB"])
def test_auto_micro_batch_is_the_largest_that_fits(gpu):
    cfg = recipe(
        FALCON_7B,
        "train.micro_batch_size=auto",
        "train.gradient_checkpointing=auto",
        "data.max_seq_len=512",
        f"hardware.gpu={gpu}",
        "distributed.procs_per_node=1",
    )
    fit, room = estimate(cfg, gpus=1).fit, budget(cfg)
    m = fit.micro_batch_size
    assert fit.micro_setting == "auto" and fit.checkpointed_layers == 0
    assert peak(cfg, m, 0) <= room
    assert m == 64 or peak(cfg, m + 1, 0) > room


def test_auto_micro_batch_keeps_the_global_batch():
    cfg = recipe(
        FALCON_7B,
        "train.micro_batch_size=auto",
        "train.global_batch_size=96",
        "data.max_seq_len=512",
        "hardware.gpu=A10G-24GB",
        "distributed.procs_per_node=2",
    )
    fit = estimate(cfg).fit
    assert fit.micro_batch_size * fit.grad_accum * 2 == 96
    assert (96 // 2) % fit.micro_batch_size == 0
    record = fit.micro_record(2)
    assert record["global_batch_size"] == 96 and record["setting"] == "auto"
    # no GPU to fit against: the largest allowed, nothing checkpointed
    cpu = estimate(recipe(TINY_DEMO, "train.micro_batch_size=auto"), rows_per_rank=20).fit
    assert (cpu.micro_batch_size, cpu.checkpointed_layers, cpu.budget_gb) == (20, 0, None)


def test_settings_are_validated_with_the_key():
    with pytest.raises(UserError, match="train.micro_batch_size must be > 0 or auto, got 0"):
        recipe(TINY_DEMO, "train.micro_batch_size=0")
    with pytest.raises(UserError, match="train.micro_batch_size must be > 0 or auto, got 'big'"):
        recipe(TINY_DEMO, "train.micro_batch_size=big")
    with pytest.raises(UserError, match="train.gradient_checkpointing must be true, false or auto"):
        recipe(TINY_DEMO, "train.gradient_checkpointing=sometimes")
    with pytest.raises(UserError, match="train.global_batch_size=15 is not a multiple of the 2"):
        recipe(TINY_DEMO, "train.micro_batch_size=auto", "train.global_batch_size=15")
    with pytest.raises(UserError, match="train.global_batch_size=32 but micro_batch_size 8"):
        recipe(TINY_DEMO, "train.global_batch_size=32")
    assert recipe(TINY_DEMO, "train.micro_batch_size=4").train.micro_batch_size == 4


@pytest.mark.integration  # a CLI process (as test_plan's CLI run)
def test_plan_cli_shows_the_auto_choices(cli):
    result = cli(
        "plan",
        FALCON_7B,
        "--set",
        "train.micro_batch_size=auto",
        "--set",
        "hardware.gpu=A10G-24GB",
        "--set",
        "data.max_seq_len=2048",
    )
    assert result.code == 0, result
    assert "micro batch auto:" in result.out and "gradient checkpointing auto:" in result.out


@pytest.mark.parametrize("arch", ["falcon", "llama"])
def test_checkpointing_some_layers_gives_the_same_gradients(arch):
    model = AutoModelForCausalLM.from_pretrained(
        resolve_model(f"tiny://{arch}"), dtype=torch.float32
    )
    partial = copy.deepcopy(model)
    layers = decoder_layers(partial)
    apply_checkpointing(partial, layers, 1)
    assert checkpointed_layers(layers) == 1 and layers[0].gradient_checkpointing
    assert checkpointed_layers(decoder_layers(model)) == 0
    ids = torch.randint(3, 500, (2, 16), generator=torch.Generator().manual_seed(0))
    for m in (model, partial):
        m.train()
        m(input_ids=ids, labels=ids).loss.backward()
    for (name, a), (_, b) in zip(model.named_parameters(), partial.named_parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_a_layer_that_fails_to_compile_runs_eagerly_with_one_line():
    model = AutoModelForCausalLM.from_pretrained(resolve_model("tiny://llama"), dtype=torch.float32)
    compiled = copy.deepcopy(model)
    lines = []

    def broken_backend(graph, inputs):
        raise RuntimeError("no kernel for this op")

    compile_layers(decoder_layers(compiled), backend=broken_backend, log=lines.append)
    ids = torch.randint(3, 500, (1, 12), generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        with torch.no_grad():
            torch.testing.assert_close(compiled(input_ids=ids).logits, model(input_ids=ids).logits)
    assert len(lines) == 1 and "they run eagerly" in lines[0] and "no kernel" in lines[0]
