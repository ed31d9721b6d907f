"""gpt-oss (OpenAI's open-weight MoE): 32 routed experts (4 per token) with biases, fused as
3-D parameters on transformers v5 beside a linear router with a bias (`mlp.router`); attention
with learned sinks (one logit per head) and sliding-window layers (128 tokens) alternating with
full ones; biases on the attention projections. transformers has no SDPA path for its sinks:
without flash or flex attention it runs eager attention. Its published checkpoints store the
experts in MXFP4."""

from __future__ import annotations

from .base import TINY_SHAPE, Family
from .llama import EXPERTS, PROJECTIONS, published_config


def tiny_gpt_oss(**kw):
    """What makes it gpt-oss: 4 routed experts (top-2) with biases, stored transposed (experts x
    in x out) and not square here (intermediate 96), attention sinks, a sliding-window layer
    (8 tokens) beside a full one, YaRN RoPE."""
    from transformers import GptOssConfig

    return GptOssConfig(
        **{**TINY_SHAPE, "intermediate_size": 96},  # MXFP4 packs 32 weights a block
        num_local_experts=4,
        num_experts_per_tok=2,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention"],
        tie_word_embeddings=False,
        # its YaRN RoPE, scaled to the tiny context (2,048 = 2 x 1,024)
        rope_parameters={
            "rope_type": "yarn",
            "factor": 2.0,
            "rope_theta": 150000.0,
            "original_max_position_embeddings": 1024,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "truncate": False,
        },
        **kw,
    )


GPT_OSS = Family(
    name="gpt_oss",
    model_types=("gpt_oss",),
    lora_targets=PROJECTIONS,
    expert_lora=EXPERTS,
    experts_transposed=True,
    attention_fallback="eager",
    router="mlp.router",
    unquantized={
        "mlp.router.weight": "the router: experts x hidden, a sliver of the weights, and its "
        "logits choose each token's experts"
    },
    configs={
        "openai/gpt-oss-20b": {
            **published_config("gpt_oss", 2880, 2880, 24, 64, 8, 201088),
            "head_dim": 64,
            "num_local_experts": 32,
            "num_experts_per_tok": 4,
            "sliding_window": 128,
        }
    },
    tiny={"gpt-oss": tiny_gpt_oss},
)
