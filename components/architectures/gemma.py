"""Gemma and Gemma 3 (its text model, `gemma3_text`): the Llama family's projections and gated
MLP, tied embeddings, and in Gemma 3 local sliding-window layers between global ones (five to
one) with 262K-token vocabularies."""

from __future__ import annotations

from .base import Family
from .llama import GATED_MLP, PROJECTIONS, published_config

GEMMA = Family(name="gemma", model_types=("gemma",), lora_targets=PROJECTIONS + GATED_MLP)
GEMMA3 = Family(
    name="gemma3",
    model_types=("gemma3_text",),
    lora_targets=PROJECTIONS + GATED_MLP,
    configs={
        "google/gemma-3-1b-pt": {
            **published_config("gemma3_text", 1152, 6912, 26, 4, 1, 262144),
            "head_dim": 256,
            "sliding_window": 512,
            "tie_word_embeddings": True,
        }
    },
)
