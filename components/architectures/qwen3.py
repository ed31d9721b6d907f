"""Qwen3 (dense) and Qwen3-MoE. Qwen3's attention normalises queries and keys per head
(q_norm, k_norm) after their projections. Qwen3-MoE replaces every MLP with 128 routed experts
(8 per token, no shared expert), which transformers v5 stores fused as 3-D parameters
(`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`) beside a linear router (`mlp.gate`): not
nn.Linear modules, so neither bitsandbytes' layer swap nor LoRA on linear layers reaches them.
Qwen3.5-MoE is hybrid: three Gated DeltaNet (linear attention) layers to each full attention
layer, 256 routed experts (8 per token) plus a gated shared expert; packed rows run through
its linear-attention layers one example at a time (train/linear_attention.py)."""

from __future__ import annotations

from .base import TINY_SHAPE, Family
from .llama import EXPERTS, GATED_MLP, PROJECTIONS, published_config

ROUTER = {
    "mlp.gate.weight": "the router: experts x hidden, a sliver of the weights, and its logits "
    "choose each token's experts (QLoRA keeps it in the compute dtype)"
}


def tiny_qwen3(**kw):
    from transformers import Qwen3Config

    return Qwen3Config(**TINY_SHAPE, tie_word_embeddings=True, **kw)


def tiny_qwen3_moe(**kw):
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        **TINY_SHAPE,
        moe_intermediate_size=64,  # bitsandbytes' CPU inference path needs >= its block (64)
        num_experts=4,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        tie_word_embeddings=False,
        **kw,
    )


def tiny_qwen3_5_moe(**kw):
    """What makes it Qwen3.5-MoE: Gated DeltaNet layers beside a full-attention one (3:1),
    4 routed experts (top-2) and a gated shared expert."""
    from transformers.models.qwen3_5_moe.configuration_qwen3_5_moe import Qwen3_5MoeTextConfig

    return Qwen3_5MoeTextConfig(
        **{**TINY_SHAPE, "num_hidden_layers": 4},
        linear_key_head_dim=16,
        linear_value_head_dim=16,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        moe_intermediate_size=64,  # bitsandbytes' CPU path needs >= its block (64)
        shared_expert_intermediate_size=64,
        num_experts=4,
        num_experts_per_tok=2,
        layer_types=["linear_attention"] * 3 + ["full_attention"],
        tie_word_embeddings=False,
        **kw,
    )


QWEN3 = Family(
    name="qwen3",
    model_types=("qwen3",),
    lora_targets=PROJECTIONS + GATED_MLP,
    configs={
        "Qwen/Qwen3-8B": {
            **published_config("qwen3", 4096, 12288, 36, 32, 8, 151936),
            "head_dim": 128,
        }
    },
    tiny={"qwen3": tiny_qwen3},
)
# `auto` adapts attention and the routed experts (their fused parameters); the router stays
# frozen.
QWEN3_MOE = Family(
    name="qwen3_moe",
    model_types=("qwen3_moe",),
    lora_targets=PROJECTIONS,
    unquantized=ROUTER,
    router="mlp.gate",
    experts_4bit=("gate_proj", "up_proj", "down_proj"),
    expert_lora=EXPERTS,
    configs={
        "Qwen/Qwen3-30B-A3B": {
            **published_config("qwen3_moe", 2048, 6144, 48, 32, 4, 151936),
            "head_dim": 128,
            "moe_intermediate_size": 768,
            "num_experts": 128,
            "num_experts_per_tok": 8,
        }
    },
    tiny={"qwen3-moe": tiny_qwen3_moe},
)
# Qwen3.5-MoE (its text model; the hub's checkpoints are the multimodal model's, whose language
# model's weights sit under `model.language_model.`).
QWEN3_5_MOE = Family(
    name="qwen3_5_moe",
    model_types=("qwen3_5_moe_text",),
    # full attention, the linear-attention projections, the shared expert (and the routed
    # experts as parameters: expert_lora)
    lora_targets=PROJECTIONS + ("in_proj_qkv", "in_proj_z", "out_proj") + GATED_MLP,
    unquantized={
        **ROUTER,
        "linear_attn.conv1d.weight": "the linear-attention layers' short convolution (4 taps "
        "per channel): not a linear layer, a sliver of the weights",
        "linear_attn.in_proj_a.weight": "the linear-attention layers' decay and gate "
        "projections (one output per value head): slivers whose outputs set the state's decay",
        "linear_attn.in_proj_b.weight": "(as in_proj_a)",
        "mlp.shared_expert_gate.weight": "the shared expert's gate (one output): a sliver",
    },
    router="mlp.gate",
    experts_4bit=("gate_proj", "up_proj", "down_proj"),
    expert_lora=EXPERTS,
    checkpoint_renames={"model.language_model.": "model."},
    configs={
        "Qwen/Qwen3.5-35B-A3B": {
            **published_config("qwen3_5_moe_text", 2048, 512, 40, 16, 2, 248320),
            "head_dim": 256,
            "linear_key_head_dim": 128,
            "linear_value_head_dim": 128,
            "linear_num_key_heads": 16,
            "linear_num_value_heads": 32,
            "linear_conv_kernel_dim": 4,
            "moe_intermediate_size": 512,
            "shared_expert_intermediate_size": 512,
            "num_experts": 256,
            "num_experts_per_tok": 8,
            "layer_types": [
                "full_attention" if i % 4 == 3 else "linear_attention" for i in range(40)
            ],
        }
    },
    tiny={"qwen3.5-moe": tiny_qwen3_5_moe},
)
