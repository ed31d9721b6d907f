"""Gemma and Gemma 3 (its text model, `gemma3_text`): the Llama family's projections and gated
MLP, tied embeddings, and in Gemma 3 local sliding-window layers between global ones (five to
one) with 262K-token vocabularies."""

from __future__ import annotations

from .base import TINY_SHAPE, Family
from .llama import GATED_MLP, PROJECTIONS, published_config


def tiny_gemma3(**kw):
    """What makes it Gemma 3: local sliding-window layers (a window of 8 tokens here, so a
    packed row's examples outgrow it) beside a global one, tied embeddings."""
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(
        **{**TINY_SHAPE, "num_hidden_layers": 3},
        query_pre_attn_scalar=16,
        sliding_window=8,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        tie_word_embeddings=True,
        **kw,
    )


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
    tiny={"gemma3": tiny_gemma3},
)
