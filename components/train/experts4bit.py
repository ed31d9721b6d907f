"""QLoRA for mixture-of-experts models: every routed expert a bitsandbytes 4-bit (or 8-bit)
layer.

transformers v5 holds a MoE layer's experts as two fused 3-D parameters (`experts.gate_up_proj`:
experts x 2*intermediate x hidden; `experts.down_proj`: experts x hidden x intermediate).
bitsandbytes replaces nn.Linear modules only, so its integration leaves them, most of the
model's weights, in bf16 without a word (bitsandbytes #1849). For a family whose record says
its experts are the plain SwiGLU kind (`experts_4bit`: Qwen3-MoE, Mixtral), `Experts4bit`
replaces the fused module with one quantized linear layer per expert and projection, and runs
transformers' own eager expert loop over them; `ExpertTensors` streams the checkpoint's experts
into it, one expert's tensors at a time, from either layout: one tensor per expert and
projection (the hub's checkpoints: `experts.E.gate_proj.weight`, or Mixtral's `w1`/`w3`/`w2`)
or the fused 3-D tensors.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
from torch import nn

PER_EXPERT = re.compile(r"^(?P<layer>.+)\.experts\.(?P<expert>\d+)\.(?P<part>\w+)\.weight$")
FUSED = re.compile(r"^(?P<layer>.+)\.experts\.(?P<part>gate_up_proj|down_proj)$")


class Experts4bit(nn.Module):
    """A MoE layer's experts, each projection one quantized linear layer (`gate_up[e]`,
    `down[e]`); the forward is transformers' eager experts loop (Qwen3-MoE's and Mixtral's are
    the same code)."""

    def __init__(self, fused: nn.Module, make_linear: Callable[[int, int], nn.Module]):
        super().__init__()
        experts, two_inter, hidden = fused.gate_up_proj.shape
        self.num_experts = experts
        self.act_fn = fused.act_fn
        self.gate_up = nn.ModuleList(make_linear(hidden, two_inter) for _ in range(experts))
        self.down = nn.ModuleList(make_linear(two_inter // 2, hidden) for _ in range(experts))

    def forward(self, hidden_states, top_k_index, top_k_weights):
        final = torch.zeros_like(hidden_states)
        with torch.no_grad():
            mask = nn.functional.one_hot(top_k_index, num_classes=self.num_experts + 1)
            mask = mask.permute(2, 1, 0)
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        for index in hit:
            expert = int(index[0])
            if expert == self.num_experts:
                continue
            top_k_pos, token_idx = torch.where(mask[expert])
            gate, up = self.gate_up[expert](hidden_states[token_idx]).chunk(2, dim=-1)
            out = self.down[expert](self.act_fn(gate) * up)
            out = out * top_k_weights[token_idx, top_k_pos, None]
            final.index_add_(0, token_idx, out.to(final.dtype))
        return final


def replace_fused_experts(model: nn.Module, make_linear: Callable[[int, int], nn.Module]) -> None:
    """Swap every fused experts module of a (meta) model for an Experts4bit."""
    fused = [
        name
        for name, module in model.named_modules()
        if isinstance(getattr(module, "gate_up_proj", None), nn.Parameter)
        and module.gate_up_proj.ndim == 3
    ]
    for name in fused:
        parent, _, child = name.rpartition(".")
        setattr(
            model.get_submodule(parent), child, Experts4bit(model.get_submodule(name), make_linear)
        )


class ExpertTensors:
    """Routes the checkpoint's expert tensors into the Experts4bit layers: `take(name, tensor)`
    (`name`: the key after `rename`) is True when the tensor was an expert's, quantized with
    `quantize(layer, weight)` as soon as a projection is whole (gate and up are one layer,
    joined as transformers joins them). `names`: the family record's `experts_4bit`; None for a
    family whose experts are not quantized this way (nothing is taken, keys are only renamed)."""

    def __init__(self, model: nn.Module, names: tuple[str, str, str] | None,
                 renames: dict[str, str], quantize: Callable[[nn.Module, torch.Tensor], None]):  # fmt: skip
        self.model, self.quantize, self.names = model, quantize, names
        self.gate, self.up, self.down = names or ("", "", "")
        self.renames = renames
        self.waiting: dict[tuple[str, int], dict[str, torch.Tensor]] = {}

    def rename(self, key: str) -> str:
        for old, new in self.renames.items():
            key = key.replace(old, new)
        return key

    def take(self, key: str, tensor: torch.Tensor) -> bool:
        if self.names is None:
            return False
        if found := FUSED.match(key):
            experts = self._experts(found["layer"])
            if experts is None:
                return False
            target = experts.gate_up if found["part"] == "gate_up_proj" else experts.down
            for expert, weight in enumerate(tensor):
                self.quantize(target[expert], weight)
            return True
        found = PER_EXPERT.match(key)
        if not found or found["part"] not in (self.gate, self.up, self.down):
            return False
        experts = self._experts(found["layer"])
        if experts is None:
            return False
        expert = int(found["expert"])
        if found["part"] == self.down:
            self.quantize(experts.down[expert], tensor)
            return True
        parts = self.waiting.setdefault((found["layer"], expert), {})
        parts[found["part"]] = tensor
        if len(parts) == 2:  # transformers' gate_up_proj is [gate; up]
            del self.waiting[(found["layer"], expert)]
            self.quantize(experts.gate_up[expert], torch.cat([parts[self.gate], parts[self.up]]))
        return True

    def _experts(self, layer: str) -> Experts4bit | None:
        try:
            module = self.model.get_submodule(f"{layer}.experts")
        except AttributeError:
            return None
        return module if isinstance(module, Experts4bit) else None
