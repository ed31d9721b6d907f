"""Gemma and Gemma 3 (its text model, `gemma3_text`): the Llama family's projections and gated
MLP, tied embeddings, and in Gemma 3 local sliding-window layers between global ones (five to
one) with 262K-token vocabularies."""

from __future__ import annotations

from .base import Family
from .llama import GATED_MLP, PROJECTIONS

GEMMA = Family(name="gemma", model_types=("gemma",), lora_targets=PROJECTIONS + GATED_MLP)
GEMMA3 = Family(
    name="gemma3",
    model_types=("gemma3_text",),
    lora_targets=PROJECTIONS + GATED_MLP,
    configs={
        "google/gemma-3-1b-pt": {
            "model_type": "gemma3_text",
            "hidden_size": 1152,
            "intermediate_size": 6912,
            "num_hidden_layers": 26,
            "num_attention_heads": 4,
            "num_key_value_heads": 1,
            "head_dim": 256,
            "vocab_size": 262144,
            "sliding_window": 512,
            "tie_word_embeddings": True,
        }
    },
)
