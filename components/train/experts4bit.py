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

import math
import re
from collections.abc import Callable

import torch
from torch import nn

# an Experts4bit's LoRA pair in a state dict: `...experts.lora_<leaf>_<A|B>`
LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<leaf>gate_up_proj|down_proj)_(?P<part>[AB])$")
PER_EXPERT = re.compile(r"^(?P<layer>.+)\.experts\.(?P<expert>\d+)\.(?P<part>\w+)\.weight$")
FUSED = re.compile(r"^(?P<layer>.+)\.experts\.(?P<part>gate_up_proj|down_proj)$")


class ExpertKeys:
    """A family's checkpoint names for its experts' tensors, one per expert and projection
    (`names`: the record's `experts_4bit`, the gate's, up's and down's; None: the family has no
    such tensors; `renames`: its `checkpoint_renames`). `locate(key)`, on a renamed key, gives
    (the layer, the fused tensor's leaf, the expert, the part: 0 gate or down, 1 up)."""

    def __init__(self, names: tuple[str, str, str] | None, renames: dict[str, str]) -> None:
        self.renames = renames
        self.parts: dict[str, tuple[str, int]] = {}
        if names is not None:
            gate, up, down = names
            self.parts = {gate: ("gate_up_proj", 0), up: ("gate_up_proj", 1),
                          down: ("down_proj", 0)}  # fmt: skip

    def rename(self, key: str) -> str:
        for old, new in self.renames.items():
            key = key.replace(old, new)
        return key

    def locate(self, key: str) -> tuple[str, str, int, int] | None:
        found = PER_EXPERT.match(key)
        if not found or found["part"] not in self.parts:
            return None
        leaf, part = self.parts[found["part"]]
        return found["layer"], leaf, int(found["expert"]), part

    def fused(self, key: str) -> tuple[str, int, int] | None:
        """(the fused tensor's name, the expert, the part) of a checkpoint key as stored."""
        located = self.locate(self.rename(key))
        if located is None:
            return None
        layer, leaf, expert, part = located
        return f"{layer}.experts.{leaf}", expert, part


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
        self.lora_scaling = 0.0
        self.lora_leaves: set[str] = set()
        self.lora_off = False  # the base's experts alone (a preference objective's reference)

    def add_lora(self, r: int, scaling: float, leaves: set[str]) -> None:
        """LoRA on the experts (methods/expert_lora.py): per projection `leaf` (gate_up_proj,
        down_proj) an fp32 pair in peft's stacked layout, A Kaiming-uniform, B zero."""
        for leaf, layers in (("gate_up_proj", self.gate_up), ("down_proj", self.down)):
            if leaf not in leaves:
                continue
            first = layers[0]
            device = first.weight.device
            lora_a = torch.empty(r * self.num_experts, first.in_features, device=device)
            nn.init.kaiming_uniform_(lora_a, a=math.sqrt(5))
            lora_b = torch.zeros(first.out_features, r * self.num_experts, device=device)
            self.register_parameter(f"lora_{leaf}_A", nn.Parameter(lora_a))
            self.register_parameter(f"lora_{leaf}_B", nn.Parameter(lora_b))
        self.lora_scaling, self.lora_leaves = scaling, set(leaves)

    def _project(self, leaf: str, layers: nn.ModuleList, expert: int, x: torch.Tensor):
        out = layers[expert](x)
        if leaf not in self.lora_leaves or self.lora_off:
            return out
        lora_a, lora_b = getattr(self, f"lora_{leaf}_A"), getattr(self, f"lora_{leaf}_B")
        rank = lora_a.shape[0] // self.num_experts
        a = lora_a.view(self.num_experts, rank, -1)[expert]
        b = lora_b.view(lora_b.shape[0], rank, self.num_experts)[:, :, expert]
        low = (x.to(a.dtype) @ a.T) @ b.T
        return out + (low * self.lora_scaling).to(out.dtype)

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
            x = hidden_states[token_idx]
            gate, up = self._project("gate_up_proj", self.gate_up, expert, x).chunk(2, dim=-1)
            out = self._project("down_proj", self.down, expert, self.act_fn(gate) * up)
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
        self.keys = ExpertKeys(names, renames)
        self.rename = self.keys.rename
        self.waiting: dict[tuple[str, int], dict[int, torch.Tensor]] = {}

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
        located = self.keys.locate(key)
        experts = self._experts(located[0]) if located else None
        if located is None or experts is None:
            return False
        layer, leaf, expert, part = located
        if leaf == "down_proj":
            self.quantize(experts.down[expert], tensor)
            return True
        parts = self.waiting.setdefault((layer, expert), {})
        parts[part] = tensor
        if len(parts) == 2:  # transformers' gate_up_proj is [gate; up]
            del self.waiting[(layer, expert)]
            self.quantize(experts.gate_up[expert], torch.cat([parts[0], parts[1]]))
        return True

    def _experts(self, layer: str) -> Experts4bit | None:
        try:
            module = self.model.get_submodule(f"{layer}.experts")
        except AttributeError:
            return None
        return module if isinstance(module, Experts4bit) else None


class ExpertStacks:
    """Fused expert tensors (experts x out x in, gate and up joined) assembled from a
    checkpoint's per-expert tensors, for a model that keeps its experts fused (bf16 LoRA or
    full fine-tuning streamed into FSDP shards, train/meta_load.py). `wanted`: each fused
    tensor's name (as the model names it) -> its experts; `names` and `renames`: the family
    record's `experts_4bit` and `checkpoint_renames`. `take(key, tensor)` returns the fused
    tensors this one completes."""

    def __init__(self, wanted: dict[str, int], names: tuple[str, str, str] | None,
                 renames: dict[str, str]) -> None:  # fmt: skip
        self.wanted = wanted
        self.keys = ExpertKeys(names, renames)
        self.waiting: dict[str, dict[tuple[int, int], torch.Tensor]] = {}

    def needs(self, key: str) -> bool:
        return self._target(key) is not None

    def _target(self, key: str) -> tuple[str, int, int] | None:
        found = self.keys.fused(key)
        return found if found and found[0] in self.wanted else None

    def take(self, key: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        target = self._target(key)
        if target is None:
            return []
        name, expert, part = target
        pieces = self.waiting.setdefault(name, {})
        pieces[(expert, part)] = tensor
        parts = 2 if name.endswith("gate_up_proj") else 1
        if len(pieces) < self.wanted[name] * parts:
            return []
        del self.waiting[name]
        stacked = [
            torch.cat([pieces[(e, p)] for p in range(parts)]) for e in range(self.wanted[name])
        ]
        return [(name, torch.stack(stacked))]


class Mxfp4Experts:
    """Fused expert tensors dequantized from a checkpoint that stores them in MXFP4 (gpt-oss:
    `experts.gate_up_proj_blocks` and `_scales` per fused tensor), for a model built without
    transformers' loader (train/meta_load.py): transformers' own dequantization, to the layout
    the model holds (experts x in x out). `wanted`: the fused tensors' names."""

    SUFFIXES = ("_blocks", "_scales")

    def __init__(self, wanted) -> None:
        self.wanted = set(wanted)
        self.waiting: dict[str, dict[str, torch.Tensor]] = {}

    def needs(self, key: str) -> bool:
        return key.endswith(self.SUFFIXES) and key.rsplit("_", 1)[0] in self.wanted

    def take(self, key: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        if not self.needs(key):
            return []
        name, part = key.rsplit("_", 1)
        parts = self.waiting.setdefault(name, {})
        parts[part] = tensor
        if len(parts) < 2:
            return []
        del self.waiting[name]
        from transformers.integrations.mxfp4 import convert_moe_packed_tensors

        return [(name, convert_moe_packed_tensors(parts["blocks"], parts["scales"]))]
