"""Falcon (7B: multi-query attention; 40B/180B: the new decoder architecture with grouped KV
heads). Its linear layers are `FalconLinear`, a subclass of nn.Linear that transformers'
bitsandbytes integration skips: kubetune quantizes them itself (train/modeling.py). No
gated MLP, no Liger kernels; its flex_attention path is kubetune's (`flex_forward` below),
built on transformers' SDPA model."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import Family

if TYPE_CHECKING:
    from torch import nn

_SCALE = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}

# Falcon-40B and -180B: the new decoder architecture with 8 grouped KV heads.
_NEW_DECODER = {
    "model_type": "falcon",
    "num_kv_heads": 8,
    "new_decoder_architecture": True,
    "parallel_attn": True,
    "bias": False,
    "alibi": False,
    "vocab_size": 65024,
}
CONFIGS = {
    "tiiuae/falcon-7b": {
        "model_type": "falcon",
        "hidden_size": 4544,
        "num_hidden_layers": 32,
        "num_attention_heads": 71,
        "multi_query": True,
        "parallel_attn": True,
        "new_decoder_architecture": False,
        "bias": False,
        "alibi": False,
        "vocab_size": 65024,
    },
    "tiiuae/falcon-40b": {
        **_NEW_DECODER,
        "hidden_size": 8192,
        "num_hidden_layers": 60,
        "num_attention_heads": 128,
    },
    "tiiuae/falcon-180B": {
        **_NEW_DECODER,
        "hidden_size": 14848,
        "num_hidden_layers": 80,
        "num_attention_heads": 232,
    },
}


def tiny_falcon(**kw):
    from transformers import FalconConfig

    # Falcon-7B's layout: multi-query attention, parallel attention/MLP, no biases.
    return FalconConfig(
        **_SCALE,
        multi_query=True,
        parallel_attn=True,
        new_decoder_architecture=False,
        bias=False,
        alibi=False,
        **kw,
    )


def tiny_falcon40b(**kw):
    from transformers import FalconConfig

    # Falcon-40B/180B's layout: the new decoder architecture with grouped KV heads.
    return FalconConfig(
        **_SCALE,
        num_kv_heads=2,
        new_decoder_architecture=True,
        parallel_attn=True,
        bias=False,
        alibi=False,
        **kw,
    )


def flex_supported(config) -> bool:
    """Our flex path covers rotary Falcon (not ALiBi)."""
    return not config.alibi


def flex_forward(
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

    from ..train.attention import compiled_flex_attention

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


def install_flex(model: nn.Module) -> None:
    """Every FalconAttention of a built model runs `flex_forward`."""
    from types import MethodType

    from transformers.models.falcon.modeling_falcon import FalconAttention

    for module in model.modules():
        if isinstance(module, FalconAttention):
            module.forward = MethodType(flex_forward, module)


FALCON = Family(
    name="falcon",
    model_types=("falcon",),
    lora_targets=("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
    gated_mlp=False,
    adapter_attention=("query_key_value", "dense"),  # queries come out of the fused QKV
    flex_attention=flex_supported,
    flex_build="sdpa",  # our flex forward runs on transformers' SDPA build
    install_flex=install_flex,
    configs=CONFIGS,
    tiny={"falcon": tiny_falcon, "falcon-40b": tiny_falcon40b},
)
