"""The Llama family: Llama, Mistral, Mixtral and Qwen2 share the q/k/v/o attention
projections and a gated MLP (gate/up/down). Llama, Mistral and Qwen2 have Liger kernels and
transformers' flex_attention path."""

from __future__ import annotations

from .base import Family

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
GATED_MLP = ("gate_proj", "up_proj", "down_proj")
# transformers v5's fused experts of a MoE layer: LoRA adapts them as parameters
EXPERTS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")

# The Llama family's grouped-query layout at the tiny models' scale: 2 layers, hidden 64.
_GQA = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 128,
    "num_key_value_heads": 2,
}


def tiny_llama(**kw):
    from transformers import LlamaConfig

    return LlamaConfig(**_GQA, tie_word_embeddings=False, **kw)


def tiny_llama3_1(**kw):
    """What makes it Llama 3.1: its RoPE scaling (rope_type llama3: long wavelengths stretched
    by the factor, short ones kept), scaled to the tiny context (2,048 = 8 x 256)."""
    from transformers import LlamaConfig

    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 256,
            "rope_theta": 500000.0}  # fmt: skip
    return LlamaConfig(**_GQA, tie_word_embeddings=False, rope_parameters=rope, **kw)


def tiny_mistral(**kw):
    from transformers import MistralConfig

    return MistralConfig(**_GQA, sliding_window=None, tie_word_embeddings=False, **kw)


def tiny_qwen2(**kw):
    from transformers import Qwen2Config

    return Qwen2Config(**_GQA, tie_word_embeddings=True, **kw)


def published_config(
    model_type: str, hidden: int, intermediate: int, layers: int, heads: int, kv: int, vocab: int
) -> dict:
    """A published config.json's shape fields (grouped-query attention, untied head)."""
    return {
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "vocab_size": vocab,
        "tie_word_embeddings": False,
    }


LLAMA = Family(
    name="llama",
    model_types=("llama",),
    lora_targets=PROJECTIONS + GATED_MLP,
    liger=True,
    adapter_attention=("q_proj", "o_proj"),
    configs={
        "meta-llama/Llama-2-7b-hf": published_config("llama", 4096, 11008, 32, 32, 32, 32000),
        "meta-llama/Llama-2-13b-hf": published_config("llama", 5120, 13824, 40, 40, 40, 32000),
        "meta-llama/Meta-Llama-3-8B": published_config("llama", 4096, 14336, 32, 32, 8, 128256),
        "meta-llama/Meta-Llama-3-70B": published_config("llama", 8192, 28672, 80, 64, 8, 128256),
        # Llama 3.1: the same shapes, 128K positions through its RoPE scaling
        "meta-llama/Llama-3.1-8B": {
            **published_config("llama", 4096, 14336, 32, 32, 8, 128256),
            "max_position_embeddings": 131072,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
        },
    },
    tiny={"llama": tiny_llama, "llama3.1": tiny_llama3_1},
)
MISTRAL = Family(
    name="mistral",
    model_types=("mistral",),
    lora_targets=PROJECTIONS + GATED_MLP,
    liger=True,
    adapter_attention=("q_proj", "o_proj"),
    configs={
        "mistralai/Mistral-7B-v0.1": published_config("mistral", 4096, 14336, 32, 32, 8, 32000),
    },
    tiny={"mistral": tiny_mistral},
)


def tiny_mixtral(**kw):
    from transformers import MixtralConfig

    # what makes it Mixtral: routed experts (4 here, top-2), no shared expert
    return MixtralConfig(
        **_GQA, num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=False, **kw
    )


# Mixtral's experts are fused 3-D parameters on transformers v5 (as Qwen3-MoE's: qwen3.py):
# `auto` adapts attention and the experts (as parameters), and a 4-bit base quantizes each.
MIXTRAL = Family(
    name="mixtral",
    model_types=("mixtral",),
    lora_targets=PROJECTIONS,
    adapter_attention=("q_proj", "o_proj"),
    router="mlp.gate",
    experts_4bit=("w1", "w3", "w2"),
    expert_lora=EXPERTS,
    checkpoint_renames={".block_sparse_moe.": ".mlp."},
    unquantized={
        "mlp.gate.weight": "the router: experts x hidden, a sliver of the weights, and its "
        "logits choose each token's experts"
    },
    configs={
        "mistralai/Mixtral-8x7B-v0.1": {
            **published_config("mixtral", 4096, 14336, 32, 32, 8, 32000),
            "num_local_experts": 8,
            "num_experts_per_tok": 2,
        }
    },
    tiny={"mixtral": tiny_mixtral},
)
QWEN2 = Family(
    name="qwen2",
    model_types=("qwen2",),
    lora_targets=PROJECTIONS + GATED_MLP,
    liger=True,
    adapter_attention=("q_proj", "o_proj"),
    configs={
        "Qwen/Qwen2-7B": published_config("qwen2", 3584, 18944, 28, 28, 4, 152064),
        # Qwen (2023), whose hub checkpoints are remote code (QWenLMHeadModel): the same layer
        # as Qwen2's (biased fused qkv, SwiGLU, RMSNorm, rotary, untied head) with its own
        # shapes (config.json's intermediate_size counts both of w1 and w2: 22016 and 27392);
        # for `plan` and the speed model's calibration (Qwen's README profiling table)
        "Qwen/Qwen-7B": published_config("qwen2", 4096, 11008, 32, 32, 32, 151936),
        "Qwen/Qwen-14B": published_config("qwen2", 5120, 13696, 40, 40, 40, 152064),
    },
    tiny={"qwen2": tiny_qwen2},
)
