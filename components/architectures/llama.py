"""The Llama family: Llama, Mistral, Mixtral, Qwen2 and Gemma share the q/k/v/o attention
projections and a gated MLP (gate/up/down). Llama, Mistral and Qwen2 have Liger kernels and
transformers' flex_attention path."""

from __future__ import annotations

from .base import Family

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
GATED_MLP = ("gate_proj", "up_proj", "down_proj")

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


def tiny_mistral(**kw):
    from transformers import MistralConfig

    return MistralConfig(**_GQA, sliding_window=None, tie_word_embeddings=False, **kw)


def tiny_qwen2(**kw):
    from transformers import Qwen2Config

    return Qwen2Config(**_GQA, tie_word_embeddings=True, **kw)


def _llama3(hidden: int, intermediate: int, layers: int, heads: int) -> dict:
    return {
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "tie_word_embeddings": False,
    }


LLAMA = Family(
    name="llama",
    model_types=("llama",),
    lora_targets=PROJECTIONS + GATED_MLP,
    liger=True,
    adapter_attention=("q_proj", "o_proj"),
    configs={
        "meta-llama/Meta-Llama-3-8B": _llama3(4096, 14336, 32, 32),
        "meta-llama/Meta-Llama-3-70B": _llama3(8192, 28672, 80, 64),
    },
    tiny={"llama": tiny_llama},
)
MISTRAL = Family(
    name="mistral",
    model_types=("mistral",),
    lora_targets=PROJECTIONS + GATED_MLP,
    liger=True,
    adapter_attention=("q_proj", "o_proj"),
    configs={
        "mistralai/Mistral-7B-v0.1": {
            "model_type": "mistral",
            "hidden_size": 4096,
            "intermediate_size": 14336,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "vocab_size": 32000,
            "tie_word_embeddings": False,
        }
    },
    tiny={"mistral": tiny_mistral},
)
# Mixtral's experts are not adapted by `auto` (attention only, as before issue 37).
MIXTRAL = Family(
    name="mixtral",
    model_types=("mixtral",),
    lora_targets=PROJECTIONS,
    adapter_attention=("q_proj", "o_proj"),
)
QWEN2 = Family(
    name="qwen2",
    model_types=("qwen2",),
    lora_targets=PROJECTIONS + GATED_MLP,
    liger=True,
    adapter_attention=("q_proj", "o_proj"),
    configs={
        "Qwen/Qwen2-7B": {
            "model_type": "qwen2",
            "hidden_size": 3584,
            "intermediate_size": 18944,
            "num_hidden_layers": 28,
            "num_attention_heads": 28,
            "num_key_value_heads": 4,
            "vocab_size": 152064,
            "tie_word_embeddings": False,
        }
    },
    tiny={"qwen2": tiny_qwen2},
)
GEMMA = Family(name="gemma", model_types=("gemma",), lora_targets=PROJECTIONS + GATED_MLP)
