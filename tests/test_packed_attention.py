"""A packed row trains exactly as its examples would alone, for the families whose attention is
not plain causal: sliding-window layers beside global ones (Gemma 3), attention sinks with
sliding windows (gpt-oss, eager attention), linear attention (Qwen3.5-MoE), and Llama 3.1's
scaled RoPE. On the CPU the row carries the dense
block-diagonal mask collate builds; the worker's pre-hook narrows it to each layer type's
window (train/attention.py)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from kubetune.components.architectures import family
from kubetune.components.models import resolve_model
from kubetune.components.train.attention import attention_windows, windowed_masks
from kubetune.components.train.data import COUNTS, collate
from kubetune.components.train.linear_attention import split_by_document


def model_of(arch: str, **config):
    folder = resolve_model(f"tiny://{arch}")
    attn = family(AutoConfig.from_pretrained(folder).model_type).attention_fallback
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, attn_implementation=attn, **config
    )
    model.config.use_cache = False  # as the worker trains (no cache to carry state)
    return model.eval(), attn


def packed_and_alone(model, attn: str, examples: list[list[int]]):
    row = {
        "input_ids": sum(examples, []),
        "labels": sum(examples, []),
        "position_ids": sum((list(range(len(e))) for e in examples), []),
    }
    batch = collate([row], pad_id=1, attn=attn, dtype=torch.float32)
    assert batch["attention_mask"].shape[-1] == len(row["input_ids"])
    with torch.no_grad():
        packed = model(**{k: v for k, v in batch.items() if k not in COUNTS}).logits[0]
        alone = torch.cat([model(input_ids=torch.tensor([e])).logits[0] for e in examples])
    return packed, alone


@pytest.mark.parametrize(
    "arch, config",
    [
        ("gemma3", {}),
        ("gpt-oss", {}),  # sinks, YaRN
        ("mistral", {"sliding_window": 8}),  # every layer's
        ("llama3.1", {}),  # no window: its RoPE scaling, positions restarting per example
    ],
)
def test_a_packed_row_equals_its_examples_alone_with_sliding_windows_and_sinks(arch, config):
    model, attn = model_of(arch, **config)
    window = getattr(model.config, "sliding_window", None) or 8
    examples = [list(range(5, 5 + 3 * window)), list(range(40, 40 + 2 * window + 3)), [7, 8, 9]]
    assert windowed_masks(model) == (arch != "llama3.1")
    packed, alone = packed_and_alone(model, attn, examples)
    torch.testing.assert_close(packed, alone, atol=2e-5, rtol=1e-4)


def test_a_packed_row_equals_its_examples_alone_through_linear_attention():
    """Qwen3.5-MoE's Gated DeltaNet layers (convolution and recurrence along the row) beside a
    full-attention layer: each example of a packed row runs through them on its own, so the row
    gives what each example alone gives; without that, the second example starts from the
    first's state (the control)."""
    model, attn = model_of("qwen3.5-moe")
    examples = [list(range(5, 40)), list(range(40, 61)), [7, 8, 9]]
    packed, alone = packed_and_alone(model, attn, examples)
    assert (packed - alone).abs().max() > 1e-3  # transformers' torch path, as it is
    assert split_by_document(model) == 3
    packed, alone = packed_and_alone(model, attn, examples)
    torch.testing.assert_close(packed, alone, atol=2e-5, rtol=1e-4)


def test_without_the_windows_a_packed_row_attends_past_them():
    """The control: transformers passes a given 4-D mask to every layer as is, so without the
    hook a sliding layer sees the whole example and the row no longer equals its examples."""
    model, attn = model_of("gemma3")
    window = model.config.sliding_window
    examples = [list(range(5, 5 + 3 * window)), list(range(40, 40 + 2 * window))]
    packed, alone = packed_and_alone(model, attn, examples)
    assert (packed - alone).abs().max() > 1e-3


def test_attention_windows_follow_transformers_layer_types():
    from kubetune.components.architectures import TINY_BUILDERS

    assert attention_windows(TINY_BUILDERS["gemma3"]()) == {
        "sliding_attention": 8,
        "full_attention": None,
    }
    assert attention_windows(TINY_BUILDERS["llama"]()) is None
    assert attention_windows(TINY_BUILDERS["qwen3"]()) is None  # layer types, all full
    from transformers import MistralConfig

    assert attention_windows(MistralConfig(sliding_window=16)) == 16  # every layer
    assert attention_windows(TINY_BUILDERS["mistral"]()) is None  # its window left unset
