"""Model families, one record each (base.py's `Family`): Falcon (falcon.py), the Llama
family (llama.py), Qwen3, Qwen3-MoE and Qwen3.5-MoE (qwen3.py), Gemma and Gemma 3 (gemma.py), gpt-oss
(gpt_oss.py). `family(model_type)` gives a model's record, or the generic one that any
`AutoModelForCausalLM` with plain linear layers trains with.

A new family: a module with its `Family` record(s), added to FAMILIES below."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from .base import (
    FLEX,
    GENERIC,
    Family,
    auto_attention,
    linear_layer_names,
    quantized_linear_names,
)
from .falcon import FALCON
from .gemma import GEMMA, GEMMA3
from .gpt_oss import GPT_OSS
from .llama import LLAMA, MISTRAL, MIXTRAL, QWEN2
from .qwen3 import QWEN3, QWEN3_5_MOE, QWEN3_MOE

if TYPE_CHECKING:
    from torch import nn

FAMILIES: tuple[Family, ...] = (
    FALCON,
    LLAMA,
    MISTRAL,
    MIXTRAL,
    QWEN2,
    GEMMA,
    QWEN3,
    QWEN3_MOE,
    GEMMA3,
    GPT_OSS,
    QWEN3_5_MOE,
)

__all__ = [
    "FAMILIES",
    "FLEX",
    "GENERIC",
    "KNOWN_CONFIGS",
    "TINY_BUILDERS",
    "Family",
    "auto_attention",
    "decoder_layers",
    "family",
    "family_note",
    "linear_layer_names",
    "quantized_linear_names",
    "supporting",
]


def family(model_type: str) -> Family:
    """The record for a config's model_type; the generic record for any other."""
    for record in FAMILIES:
        if model_type in record.model_types:
            return record
    return GENERIC


def family_note(model_type: str) -> str | None:
    """One line for a model type with no record of its own (None for a known family): it trains
    through the generic record, without the fast paths that record lacks."""
    record = family(model_type)
    if record is not GENERIC:
        return None
    return (
        f"model type {model_type!r} has no kubetune family record: it trains through the "
        f"generic one, without {'; '.join(record.lacks())}"
    )


def supporting(feature: Callable[[Family], object]) -> list[str]:
    """The model types whose record has `feature` (for error messages: "it patches ...")."""
    return [t for record in FAMILIES if feature(record) for t in record.model_types]


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks (FSDP's wrapping unit) of any model, by its family."""
    config = getattr(model, "config", None)
    return family(getattr(config, "model_type", "")).decoder_layers(model)


# Public configs of the recipes' hub models (planning needs no download), by hub id.
KNOWN_CONFIGS: dict[str, dict] = {k: v for r in FAMILIES for k, v in r.configs.items()}
# tiny://NAME -> its config builder
TINY_BUILDERS: dict[str, Callable] = {k: v for r in FAMILIES for k, v in r.tiny.items()}
