"""gpt-oss (OpenAI's open-weight MoE): 32 routed experts (4 per token) with biases, fused as
3-D parameters on transformers v5 beside a linear router with a bias (`mlp.router`); attention
with learned sinks (one logit per head) and sliding-window layers (128 tokens) alternating with
full ones; biases on the attention projections. Its published checkpoints store the experts in
MXFP4, which kubetune does not load yet: planning only."""

from __future__ import annotations

from .base import Family
from .llama import EXPERTS, PROJECTIONS, published_config

GPT_OSS = Family(
    name="gpt_oss",
    model_types=("gpt_oss",),
    lora_targets=PROJECTIONS,
    expert_lora=EXPERTS,
    experts_transposed=True,
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
)
