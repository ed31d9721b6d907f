"""LoRA's forward in two kernels instead of six, for 4-bit, 8-bit and plain linear bases.

peft's LoRA layer computes `base(x)`, clones it (4-bit), casts x to the adapter's fp32, runs
dropout, A, B and the scaling as separate ops, casts back and adds: a clone and three
full-size temporaries per layer, and fp32 GEMMs. The fused forward here computes

    h = dropout(x) @ A^T                  (r columns; dropout skipped when p = 0 or in eval)
    base(x).addmm_(h, B^T, alpha=scale)   (the LoRA term added into the base output in place)

in the base output's dtype (bf16 on a GPU), with the fp32 adapter weights cast on the way in
(their gradients arrive in fp32: master weights). Only the layer's forward is replaced: the
parameters, their names and peft's state dict are untouched, so the saved adapter is peft's
and peft's merge applies to it.

A layer falls back to peft's own forward whenever the fast path does not apply: adapters
disabled or merged, several active adapters, DoRA or another LoRA variant, a LoRA bias, or
extra arguments. DeepSpeed ZeRO-3 keeps peft's forward (its hooks gather each submodule's
partition when that submodule is called, and the fused path reads the weights directly).
"""

from __future__ import annotations

from types import MethodType

import torch
import torch.nn.functional as F
from torch import nn


def _fast_path(layer) -> str | None:
    """The adapter name when the fused forward applies to this layer's state, else None."""
    if layer.disable_adapters or layer.merged or len(layer.active_adapters) != 1:
        return None
    name = layer.active_adapters[0]
    if name not in layer.lora_A or name in getattr(layer, "lora_variant", {}):
        return None
    if getattr(layer, "use_dora", {}).get(name) or layer.lora_B[name].bias is not None:
        return None
    return name


def fused_lora_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    name = None if (args or kwargs) else _fast_path(self)
    if name is None:
        return type(self).forward(self, x, *args, **kwargs)
    result = self.base_layer(x)
    dtype = result.dtype
    dropout = self.lora_dropout[name]
    p = dropout.p if isinstance(dropout, nn.Dropout) else 0.0
    h = F.dropout(x, p, training=True) if p and self.training else x
    h = F.linear(h.to(dtype), self.lora_A[name].weight.to(dtype))
    b = self.lora_B[name].weight.to(dtype)
    scale = self.scaling[name]
    if not result.is_contiguous():  # (never for linear outputs; kept correct regardless)
        return result + F.linear(h, b) * scale
    result.view(-1, result.shape[-1]).addmm_(h.reshape(-1, h.shape[-1]), b.t(), alpha=scale)
    return result


def lora_layer_types() -> tuple[type, ...]:
    """peft's LoRA layers over nn.Linear and bitsandbytes 4-bit/8-bit linear layers."""
    from peft.tuners import lora

    types: list[type] = [lora.Linear]
    try:
        from peft.tuners.lora import bnb as lora_bnb

        types += [
            getattr(lora_bnb, n) for n in ("Linear4bit", "Linear8bitLt") if hasattr(lora_bnb, n)
        ]
    except ImportError:  # bitsandbytes not installed
        pass
    return tuple(types)


def fuse_lora(model: nn.Module) -> int:
    """Give every peft LoRA linear layer of `model` the fused forward; returns how many."""
    kinds = lora_layer_types()
    count = 0
    for module in model.modules():
        if type(module) in kinds:
            module.forward = MethodType(fused_lora_forward, module)
            count += 1
    return count
