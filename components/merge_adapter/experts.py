"""Merging LoRA on a MoE model's routed experts (methods/expert_lora.py: peft's parameter LoRA,
`target_parameters` in adapter_config.json) into the base's shards, in either layout a base
checkpoint has:
- fused 3-D tensors (`...mlp.experts.gate_up_proj`: experts x out x in, or experts x in x out
  where the family record says its experts are transposed), as transformers v5 saves them:
  every expert's `scale * B_e @ A_e` added at once;
- one tensor per expert and projection, as the hub's checkpoints store them
  (`...mlp.experts.7.gate_proj.weight`, Mixtral's `block_sparse_moe.experts.7.w1.weight`):
  the expert's update, split into the gate and up rows as transformers joins them.
"""

from __future__ import annotations

import re

import torch

from ..architectures.base import Family
from ..errors import UserError
from ..methods.expert_lora import expert_deltas, model_order, pair_of, peft_nesting
from ..train.experts4bit import ExpertKeys


def split_expert_pairs(config: dict, tensors: dict[str, torch.Tensor], record) -> dict[str, dict]:
    """Take the expert pairs out of `tensors` (adapter names without peft's prefix): {the fused
    parameter's name: {"A", "B"}}. `record()`: the base's family record (the order its experts
    module registers the parameters decides peft's names)."""
    targets = list(config.get("target_parameters") or [])
    if not targets:
        return {}
    nesting = peft_nesting(model_order(targets, record()))
    patterns = [
        (t, re.compile(rf"^(?P<layer>.+)\.{re.escape(t.rsplit('.', 1)[0])}\."
                       rf"{re.escape(nesting[t.rsplit('.', 1)[-1]])}lora_(?P<part>[AB])\.weight$"))
        for t in targets
    ]  # fmt: skip
    pairs: dict[str, dict] = {}
    for key in list(tensors):
        for target, pattern in patterns:
            if found := pattern.match(key):
                pairs.setdefault(f"{found['layer']}.{target}", {})[found["part"]] = tensors.pop(key)
                break
    return pairs


class ExpertMerge:
    """merge_shard's update for the expert pairs (`pairs` from split_expert_pairs)."""

    def __init__(self, pairs: dict[str, dict], record: Family, rank: int, scale: float,
                 adapter) -> None:  # fmt: skip
        self.pairs, self.record, self.rank, self.scale = pairs, record, rank, scale
        self.adapter = adapter
        self.keys = ExpertKeys(record.experts_4bit, record.checkpoint_renames)

    def experts(self, name: str) -> int:
        return self.pairs[name]["A"].shape[0] // self.rank

    def per_expert(self, key: str) -> tuple[str, int, int] | None:
        """(fused parameter, expert, part: 0 gate or down, 1 up) of a per-expert base key."""
        found = self.keys.fused(key)
        return found if found and found[0] in self.pairs else None

    def missing(self, keys: set[str]) -> list[str]:
        """The adapted fused parameters the base has in neither layout."""
        covered: dict[str, set] = {}
        for key in keys:
            if (hit := self.per_expert(key)) is not None:
                covered.setdefault(hit[0], set()).add((hit[1], hit[2]))
        wanted = {
            name: {(e, p) for e in range(self.experts(name))
                   for p in ((0, 1) if name.endswith("gate_up_proj") else (0,))}
            for name in self.pairs
        }  # fmt: skip
        return sorted(n for n in self.pairs if n not in keys and covered.get(n) != wanted[n])

    def update(self, key: str, tensor: torch.Tensor) -> torch.Tensor | None:
        if key in self.pairs:
            pair = self.pairs[key]
            change = expert_deltas(pair["A"], pair["B"], tensor.shape[0], self.scale)
            if self.record.experts_transposed:
                change = change.transpose(1, 2)
            return self._checked(key, tensor, change)
        hit = self.per_expert(key)
        if hit is None:
            return None
        name, expert, part = hit
        pair = self.pairs[name]
        a, b = pair_of(pair["A"].float(), pair["B"].float(), self.experts(name), expert)
        change = (b @ a) * self.scale
        if name.endswith("gate_up_proj"):  # transformers' gate_up_proj is [gate; up]
            half = change.shape[0] // 2
            change = change[:half] if part == 0 else change[half:]
        return self._checked(key, tensor, change)

    def _checked(self, key: str, tensor: torch.Tensor, change: torch.Tensor) -> torch.Tensor:
        if change.shape != tensor.shape:
            raise UserError(
                f"{self.adapter}: the experts' LoRA update for {key} has shape "
                f"{tuple(change.shape)}, the base tensor {tuple(tensor.shape)}"
            )
        return tensor.float() + change
