"""Packed rows through linear-attention layers (Gated DeltaNet: Qwen3.5-MoE, Qwen3-Next).

A linear-attention layer carries state along the row: its short causal convolution mixes each
token with the few before it, and its recurrence carries a state matrix from token to token.
The masks that keep a packed row's examples apart in attention layers mean nothing to it, and
transformers' torch path (the CPU's, and the GPU's without the flash-linear-attention
kernels) reads no document boundaries, so a packed row's second example would start from the
first's state. `split_by_document` makes every such layer run each example of a packed row on
its own (convolution and state start from zero, as they do for the example alone) and join
the outputs: a packed row trains exactly as its examples would alone. The boundaries come from
the row's position ids (an example starts where they are 0), which a pre-hook on the decoder
stack keeps for the layers; the attention layers get the row's mask as before.
"""

from __future__ import annotations

import torch
from torch import nn


def is_linear_attention(module: nn.Module) -> bool:
    """transformers' Gated DeltaNet layers (Qwen3.5, Qwen3.5-MoE, Qwen3-Next)."""
    return type(module).__name__.endswith("GatedDeltaNet")


def starts(positions: torch.Tensor) -> list[int]:
    """Where each example of one row starts, and the row's end."""
    found = (positions == 0).nonzero().flatten().tolist()
    return ([0] if not found or found[0] != 0 else []) + found + [positions.shape[-1]]


def split_by_document(model: nn.Module) -> int:
    """Install the per-example forward on every linear-attention layer of `model` (see the
    module docstring); returns how many layers got it."""
    layers = [m for m in model.modules() if is_linear_attention(m)]
    if not layers:
        return 0
    # each row's example bounds, for the forward under way (None: no row holds two examples)
    row: dict[str, list[list[int]] | None] = {"bounds": None}

    def keep_positions(_module, args, kwargs):
        positions, mask = kwargs.get("position_ids"), kwargs.get("attention_mask")
        bounds = [starts(p) for p in positions] if positions is not None else []
        packed = any(len(b) > 2 for b in bounds)
        row["bounds"] = bounds if packed else None
        if packed and mask is not None and not isinstance(mask, dict) and len(mask.shape) == 4:
            # the row's mask is for the attention layers; the linear ones need no padding mask
            # once each example runs alone
            kwargs["attention_mask"] = {"full_attention": mask, "linear_attention": None}
            return args, kwargs
        return None

    model.base_model.register_forward_pre_hook(keep_positions, with_kwargs=True)
    for layer in layers:
        layer.forward = _per_document(layer.forward, row)
    return len(layers)


def _per_document(forward, row: dict):
    def run(hidden_states, cache_params=None, attention_mask=None, **kwargs):
        bounds = row["bounds"]
        if bounds is None or cache_params is not None:
            return forward(hidden_states, cache_params=cache_params,
                           attention_mask=attention_mask, **kwargs)  # fmt: skip
        kwargs.pop("cu_seq_lens_q", None)  # each piece is one example
        outputs = []
        for b in range(hidden_states.shape[0]):
            edges = bounds[b] if len(bounds) > 1 else bounds[0]
            pieces = [
                forward(hidden_states[b : b + 1, begin:end], **kwargs)
                for begin, end in zip(edges, edges[1:], strict=False)
            ]
            outputs.append(torch.cat(pieces, dim=1))
        return torch.cat(outputs, dim=0)

    return run
