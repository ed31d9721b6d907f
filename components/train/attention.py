"""Which attention the worker runs, and flex_attention for Falcon (which transformers lacks).

`model.attn_implementation: auto` picks, in this order:
- flash-attention 3 on Hopper (H100/H200) when its `flash_attn_interface` is installed, else
  flash-attention 2 when installed on CUDA: packed rows separated by their position ids
  (varlen kernels), no mask at all;
- on CUDA, for packed rows: PyTorch flex_attention with a sparse document mask (a `BlockMask`
  built on the device from the position ids). Llama, Mistral and Qwen2 use transformers' own
  flex path; Falcon (rotary, no ALiBi) uses `falcon_flex_forward` below, which gives
  Falcon-7B's single key/value head to every query head before the kernel: flex's GQA
  backward accumulates dK/dV for one KV head over all 71 query heads in one program per
  block, the slowest kernel of the step, where 71 independent heads run in parallel;
- else SDPA, with a dense block-diagonal mask for packed rows: the CPU fallback.
"""

from __future__ import annotations

import functools
import importlib.util
from types import MethodType
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..errors import UserError
from ..models import load_config

if TYPE_CHECKING:
    from ..config import RunConfig

FLEX = "flex_attention"


def supports_flex_attention(config) -> bool:
    """transformers' flex path for the architecture, or ours for rotary Falcon."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    if config.model_type == "falcon":
        return not config.alibi
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)
    return bool(getattr(model_class, "_supports_flex_attn", False))


def attention_implementation(cfg: RunConfig, device: torch.device, packed: bool = False) -> str:
    """The attention the worker runs (see the module docstring)."""
    if cfg.model.attn_implementation == FLEX and device.type != "cuda":
        raise UserError(
            "model.attn_implementation=flex_attention trains on CUDA only (PyTorch's "
            f"flex_attention has no backward on {device.type}); use sdpa or auto"
        )
    if cfg.model.attn_implementation != "auto":
        return cfg.model.attn_implementation
    if device.type == "cuda":
        if (
            importlib.util.find_spec("flash_attn_interface") is not None
            and torch.cuda.get_device_capability(device)[0] == 9  # Hopper: H100, H200
        ):
            return "flash_attention_3"
        if importlib.util.find_spec("flash_attn") is not None:
            return "flash_attention_2"
        if packed and supports_flex_attention(load_config(cfg.model)):
            return FLEX
    return "sdpa"


def transformers_attention(attn: str, model_type: str) -> str:
    """What transformers builds the model with: Falcon runs our flex path on its SDPA build."""
    return "sdpa" if attn == FLEX and model_type == "falcon" else attn


@functools.cache
def compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def falcon_flex_forward(
    self,
    hidden_states,
    alibi,
    attention_mask,
    position_ids=None,
    layer_past=None,
    use_cache=False,
    output_attentions=False,
    position_embeddings=None,
    **kwargs,
):
    """FalconAttention.forward for a flex `BlockMask` (rotary Falcon), as transformers' SDPA
    path computes it; any other mask goes to transformers' own forward."""
    from torch.nn.attention.flex_attention import BlockMask

    if not isinstance(attention_mask, BlockMask) or alibi is not None:
        return type(self).forward(
            self,
            hidden_states,
            alibi,
            attention_mask,
            position_ids=position_ids,
            layer_past=layer_past,
            use_cache=use_cache,
            output_attentions=output_attentions,
            position_embeddings=position_embeddings,
            **kwargs,
        )
    from transformers.models.falcon.modeling_falcon import apply_rotary_pos_emb

    kv_heads = self.num_heads if self.new_decoder_architecture else self.num_kv_heads
    query, key, value = self._split_heads(self.query_key_value(hidden_states))
    batch, length = query.shape[:2]
    query = query.transpose(1, 2).reshape(batch, self.num_heads, length, self.head_dim)
    key = key.transpose(1, 2).reshape(batch, kv_heads, length, self.head_dim)
    value = value.transpose(1, 2).reshape(batch, kv_heads, length, self.head_dim)
    query, key = apply_rotary_pos_emb(query, key, *position_embeddings)
    if layer_past is not None:
        key, value = layer_past.update(key, value, self.layer_idx)
    key, value = spread_single_kv_head(key, value, self.num_heads)
    out = compiled_flex_attention()(
        query, key, value, block_mask=attention_mask, enable_gqa=key.shape[1] != self.num_heads
    )
    out = out.permute(0, 2, 1, 3).reshape(batch, length, self.num_heads * self.head_dim)
    return self.dense(out), None


def spread_single_kv_head(key, value, heads: int):
    """Multi-query attention (one KV head) as one KV copy per query head, so flex_attention's
    backward runs the heads in parallel; autograd sums the copies' gradients back. Grouped
    KV heads (Falcon-40B/180B: 8) stay grouped."""
    if key.shape[1] != 1 or heads == 1:
        return key, value
    shape = (key.shape[0], heads, *key.shape[2:])
    return key.expand(shape).contiguous(), value.expand(shape).contiguous()


def use_flex_attention(model: nn.Module) -> None:
    """Static shapes for flex_attention's compiled kernels, and a Falcon model's attention
    layers the flex path (others have transformers').

    The worker pads every flex batch to one length (`data.flex_length`), so each kernel
    compiles once per batch shape. Left to itself, torch.compile would recompile on the second
    shape it saw with symbolic lengths, which PyTorch 2.11's flex_attention lowering could not
    do on the H100 and H200 it ran on ("NoValidChoicesError: No choices exist for backend")."""
    torch._dynamo.config.automatic_dynamic_shapes = False
    if model.config.model_type != "falcon":
        return
    from transformers.models.falcon.modeling_falcon import FalconAttention

    for module in model.modules():
        if isinstance(module, FalconAttention):
            module.forward = MethodType(falcon_flex_forward, module)
