"""LoRA on a MoE model's fused experts (methods/expert_lora.py): the pairs a 4-bit base keeps
on its Experts4bit module compute what peft's own parameter LoRA computes on the stock
transformers experts, in the same layout; peft's nesting of its wrappers is asked of peft."""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoModelForCausalLM

from kubetune.components.architectures.qwen3 import tiny_qwen3_moe
from kubetune.components.methods.expert_lora import expert_deltas, pair_of, peft_nesting
from kubetune.components.train.experts4bit import Experts4bit


def test_experts4bit_lora_computes_what_peft_computes_on_the_fused_experts():
    """Experts4bit (linear layers standing in for bitsandbytes' 4-bit ones) with its LoRA pairs
    set to peft's trained pairs gives the stock experts module's output under peft, and the
    gradient reaches every expert's pair that got tokens."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_qwen3_moe())
    config = LoraConfig(r=4, lora_alpha=12, target_modules=[],
                        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])  # fmt: skip
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for _, p in peft_model.named_parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)
    wrapper = peft_model.base_model.model.model.layers[0].mlp.experts
    stock = wrapper.get_base_layer()
    ours = Experts4bit(stock, lambda i, o: nn.Linear(i, o, bias=False))
    with torch.no_grad():
        for e in range(ours.num_experts):
            ours.gate_up[e].weight.copy_(stock.gate_up_proj[e])
            ours.down[e].weight.copy_(stock.down_proj[e])
    ours.add_lora(4, 12 / 4, {"gate_up_proj", "down_proj"})
    nesting = peft_nesting(("gate_up_proj", "down_proj"))
    by_leaf = {
        leaf: wrapper.get_submodule(nest.rstrip(".")) if nest else wrapper
        for leaf, nest in nesting.items()
    }
    with torch.no_grad():
        for leaf, module in by_leaf.items():
            assert module.parameter_name == leaf
            getattr(ours, f"lora_{leaf}_A").copy_(module.lora_A["default"].weight)
            getattr(ours, f"lora_{leaf}_B").copy_(module.lora_B["default"].weight)
    hidden = torch.randn(12, 64)
    top_k = torch.stack([torch.randperm(4)[:2] for _ in range(12)])
    weights = torch.rand(12, 2)
    expected = wrapper(hidden, top_k, weights)
    got = ours(hidden, top_k, weights)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    got.square().sum().backward()
    used = set(top_k.flatten().tolist())
    for leaf in ("gate_up_proj", "down_proj"):
        grad = getattr(ours, f"lora_{leaf}_A").grad.view(4, 4, -1)
        assert {e for e in range(4) if grad[e].abs().sum() > 0} == used


def test_expert_deltas_are_per_expert_products():
    """expert_deltas (merge's all-at-once update) equals B_e @ A_e of pair_of, each expert."""
    torch.manual_seed(1)
    experts, r = 3, 2
    lora_a, lora_b = torch.randn(experts * r, 5), torch.randn(7, experts * r)
    deltas = expert_deltas(lora_a, lora_b, experts, 0.5)
    for e in range(experts):
        a, b = pair_of(lora_a, lora_b, experts, e)
        torch.testing.assert_close(deltas[e], 0.5 * b @ a)
