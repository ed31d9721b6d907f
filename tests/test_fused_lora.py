"""The fused LoRA forward against peft's own (outputs, gradients, the saved adapter and its
merge), and the precision every tensor has after the worker builds a model."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from kubetune.components.config import load_recipe
from kubetune.components.methods.lora import add_lora
from kubetune.components.models import resolve_model
from kubetune.components.planner.fit import as_set
from kubetune.components.train.build import build_model
from kubetune.components.train.fused_lora import fuse_lora, fused_lora_forward
from kubetune.components.train.modeling import load_base
from kubetune.components.train.parallel import World

from .conftest import TINY_DEMO

CPU = torch.device("cpu")


def recipe(*sets: str):
    return load_recipe(TINY_DEMO, list(sets))


def batch():
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 500, (2, 24), generator=generator)
    labels = ids.clone()
    labels[:, :6] = -100
    return ids, labels


def lora_pair(cfg):
    """(peft's model, the same with the fused forward) with identical non-zero adapters."""
    base, _ = load_base(cfg, CPU)
    reference = add_lora(cfg, base)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # lora_B starts at zero: give it values so the term matters
        for name, p in reference.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    fused = copy.deepcopy(reference)
    assert fuse_lora(fused) > 0
    return reference, fused


def loss_and_grads(model, dropout_seed: int = 0):
    ids, labels = batch()
    torch.manual_seed(dropout_seed)
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    return loss.detach(), grads


@pytest.mark.parametrize(
    "sets, tolerance",
    [
        (("model.dtype=float32", "lora.dropout=0.0"), 1e-5),  # fp32 base: the same numbers
        (("model.dtype=float32", "lora.dropout=0.1"), 1e-5),  # dropout: same RNG, same mask
        (("model.name_or_path=tiny://llama", "model.dtype=float32"), 1e-5),
        (("method=qlora", "quant.compute_dtype=float32"), 1e-5),  # 4-bit base, fp32 compute
        (("method=qlora", "lora.dropout=0.1"), 3e-2),  # bf16 compute: the LoRA term in bf16
        (("method=qlora", "quant.bits=8", "quant.compute_dtype=float32"), 1e-4),
    ],
    ids=["fp32", "fp32-dropout", "llama-fp32", "4bit-fp32", "4bit-bf16-dropout", "8bit"],
)
def test_fused_lora_gives_peft_outputs_and_gradients(sets, tolerance):
    reference, fused = lora_pair(recipe(*sets))
    reference.train()
    fused.train()
    want_loss, want = loss_and_grads(reference)
    got_loss, got = loss_and_grads(fused)
    torch.testing.assert_close(got_loss, want_loss, rtol=tolerance, atol=tolerance)
    assert want.keys() == got.keys() and want
    for name in want:
        a, b = want[name].float(), got[name].float()
        assert b.dtype == torch.float32 and got[name].dtype == want[name].dtype  # fp32 masters
        assert (a - b).norm() <= tolerance * a.norm() + 1e-8, name


def test_fused_lora_falls_back_where_it_does_not_apply():
    reference, fused = lora_pair(recipe("model.dtype=float32"))
    ids, _ = batch()
    with torch.no_grad():
        with fused.disable_adapter(), reference.disable_adapter():
            torch.testing.assert_close(fused(input_ids=ids).logits, reference(input_ids=ids).logits)
        base_only = reference.get_base_model()
        layer = next(m for m in fused.modules() if hasattr(m, "lora_A") and m.lora_A)
        assert layer.forward.__func__ is fused_lora_forward
        fused.merge_adapter()  # merged weights: peft's forward (no second LoRA term)
        reference.merge_adapter()
        torch.testing.assert_close(fused(input_ids=ids).logits, reference(input_ids=ids).logits)
        assert base_only is not None


def test_an_adapter_trained_fused_saves_loads_and_merges_like_peft(tmp_path):
    """Only forward changes: the saved adapter is peft's, and peft's merge of it equals the
    fused model's output."""
    cfg = recipe("model.dtype=float32")
    _, fused = lora_pair(cfg)
    fused.save_pretrained(tmp_path / "adapter")
    ids, _ = batch()
    source = resolve_model("tiny://falcon")
    loaded = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32), tmp_path / "adapter"
    )
    merged = loaded.merge_and_unload()
    with torch.no_grad():
        want = fused(input_ids=ids).logits
        torch.testing.assert_close(merged(input_ids=ids).logits, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "sets, frozen_dtypes, trainable_dtypes",
    [
        (("method=qlora",), {torch.bfloat16, torch.uint8}, {torch.float32}),  # 4-bit packed
        (("method=lora", "model.dtype=bfloat16"), {torch.bfloat16}, {torch.float32}),
        # LLaMA-Adapter v2 trains the model's own norms (in its dtype) beside fp32 adapters
        (
            ("method=adapter_v2", "model.dtype=bfloat16"),
            {torch.bfloat16},
            {torch.bfloat16, torch.float32},
        ),
        (
            ("method=qlora", "model.name_or_path=tiny://llama"),
            {torch.bfloat16, torch.uint8},
            {torch.float32},
        ),
    ],
    ids=["qlora-falcon", "lora-bf16", "adapter-v2-bf16", "qlora-llama"],
)
def test_frozen_weights_stay_in_the_compute_dtype_and_trainable_ones_are_fp32(
    sets, frozen_dtypes, trainable_dtypes
):
    """No fp32 copy of any frozen weight (peft's prepare_model_for_kbit_training made the
    embeddings, norms and head fp32); every trainable tensor is an fp32 master weight."""
    cfg = recipe(*sets, "train.gradient_checkpointing=false")
    world = World(0, 0, 1, CPU)
    model = build_model(cfg, world, "sdpa", as_set(cfg, 2, "test"), packed=True).model
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    trainable = {p.dtype for p in model.parameters() if p.requires_grad}
    assert frozen == frozen_dtypes
    assert trainable == trainable_dtypes
    ids, labels = batch()
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    for p in model.parameters():
        assert not p.requires_grad or (p.grad is not None and p.grad.dtype == p.dtype)
