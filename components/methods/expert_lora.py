"""LoRA on a mixture-of-experts model's routed experts.

transformers v5 holds a MoE layer's experts as fused 3-D parameters (`mlp.experts.gate_up_proj`,
`mlp.experts.down_proj`), not nn.Linear modules, so LoRA on linear layers (`all-linear`
included) adapts attention and leaves every routed expert frozen (peft #3009). kubetune adapts
them with peft's own parameter LoRA (`target_parameters`, peft's `ParamWrapper`): per expert a
rank-r pair, `delta_e = scale * B_e @ A_e`, stored as peft stores it, so the adapter loads in
peft on the stock transformers model:
- `lora_A`: (r * experts) x in, expert e's rows `e*r .. e*r+r`;
- `lora_B`: out x (r * experts), expert e's columns `e, e+experts, ...` (peft reshapes it to
  out x r x experts);
- the wrappers nest (`experts.lora_A` adapts one parameter, `experts.base_layer.lora_A` the
  next): `peft_nesting` asks peft which is which, rather than assuming its order.

`gate_up_proj` gets one pair (rank r, its A shared by gate and up), as LoRA on any fused
projection does (Falcon's query_key_value); every adapted weight has rank `lora.r`, the one
rank vLLM reads. The router is a separate module and stays frozen. On a 4-bit base the experts
are bitsandbytes layers (train/experts4bit.py); there the same pairs, in the same layout, live
on the Experts4bit module and its forward adds them per expert.
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING

from ..errors import UserError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from ..architectures.base import Family
    from ..config import RunConfig

PEFT_PREFIX = "base_model.model."


def expert_targets(cfg: RunConfig, record: Family) -> list[str]:
    """The fused expert parameters LoRA adapts: the family's (`expert_lora`) when
    lora.target_modules is auto or all-linear; none for a list of module names."""
    if cfg.lora.target_modules in ("auto", "all-linear"):
        return list(record.expert_lora)
    return []


def check_dropout(cfg: RunConfig, targets: list[str]) -> None:
    if targets and cfg.lora.dropout:
        raise UserError(
            f"lora.dropout: {cfg.lora.dropout} cannot apply to LoRA on a MoE model's fused "
            f"experts ({', '.join(targets)}: peft's parameter LoRA has no input to drop); set "
            "lora.dropout: 0, or lora.target_modules to a list of module names (attention only)"
        )


def linear_targets(model: nn.Module, record: Family) -> list[str]:
    """`all-linear` on a MoE family, as module names: every linear layer but the head, the
    router and the experts (those are adapted as parameters)."""
    from ..architectures import linear_layer_names
    from ..train.experts4bit import Experts4bit

    inside = tuple(
        f"{name}." for name, module in model.named_modules() if isinstance(module, Experts4bit)
    )
    leaves = {
        name.rsplit(".", 1)[-1]
        for name in linear_layer_names(model)
        if not name.startswith(inside) and not (record.router and name.endswith(record.router))
    }
    return sorted(leaves)


@functools.cache
def peft_nesting(leaves: tuple[str, ...]) -> dict[str, str]:
    """For each parameter of one experts module that peft's parameter LoRA adapts (its leaf
    name, in the order the module registers them: peft nests its wrappers in that order), the
    module path peft gives its lora_A/lora_B below the experts module ("" or "base_layer."
    ...), found by letting peft wrap a stand-in module."""
    import torch
    from peft import LoraConfig, inject_adapter_in_model
    from torch import nn

    experts = nn.Module()
    for leaf in leaves:
        experts.register_parameter(leaf, nn.Parameter(torch.zeros(2, 4, 4)))
    holder = nn.Module()
    holder.experts = experts
    config = LoraConfig(r=1, target_modules=[], target_parameters=[f"experts.{x}" for x in leaves])
    holder = inject_adapter_in_model(config, holder)
    nesting = {}
    for name, module in holder.named_modules():
        if getattr(module, "parameter_name", None) in leaves and hasattr(module, "lora_A"):
            rest = name.removeprefix("experts").lstrip(".")
            nesting[module.parameter_name] = f"{rest}." if rest else ""
    return nesting


def model_order(targets, record: Family) -> tuple[str, ...]:
    """The leaf names of `targets` in the order the experts module registers them (the family
    record's `expert_lora` order; peft nests its wrappers in that order, and may write
    target_parameters to adapter_config.json in any order: it keeps them as a set)."""
    known = list(record.expert_lora)
    ordered = sorted(targets, key=lambda t: known.index(t) if t in known else len(known))
    return tuple(t.rsplit(".", 1)[-1] for t in ordered)


def pair_of(lora_a: torch.Tensor, lora_b: torch.Tensor, experts: int, expert: int):
    """Expert `expert`'s (A_e: r x in, B_e: out x r) from peft's stacked layout."""
    rank = lora_a.shape[0] // experts
    return lora_a.view(experts, rank, -1)[expert], lora_b.view(lora_b.shape[0], rank, experts)[
        :, :, expert
    ]


def expert_deltas(lora_a: torch.Tensor, lora_b: torch.Tensor, experts: int, scale: float):
    """Every expert's update (experts x out x in, fp32), as peft's ParamWrapper computes it."""
    import torch

    rank = lora_a.shape[0] // experts
    a = lora_a.float().view(experts, rank, -1)
    b = lora_b.float().view(lora_b.shape[0], rank, experts)
    return torch.einsum("ore,eri->eoi", b, a) * scale


def scaling(cfg: RunConfig) -> float:
    r, alpha = cfg.lora.r, cfg.lora.alpha
    return alpha / math.sqrt(r) if cfg.lora.use_rslora else alpha / r


def adapt_quantized_experts(cfg: RunConfig, model: nn.Module, targets: list[str]) -> int:
    """The expert LoRA pairs on every Experts4bit of a 4-bit base (peft cannot wrap a quantized
    parameter); returns how many modules got them."""
    from ..train.experts4bit import Experts4bit

    leaves = {t.rsplit(".", 1)[-1] for t in targets}
    count = 0
    for module in model.modules():
        if isinstance(module, Experts4bit):
            module.add_lora(cfg.lora.r, scaling(cfg), leaves)
            count += 1
    return count


def add_to_adapter(output, state: dict[str, torch.Tensor], leaves: tuple[str, ...]) -> int:
    """Write the Experts4bit pairs of a model state dict (`experts.lora_<leaf>_A`) into the
    adapter peft saved in `output`, under the names peft gives the same pairs on the stock
    model; returns how many tensors were added."""
    from pathlib import Path

    from safetensors.torch import load_file, save_file

    from ..artifacts import PEFT_WEIGHTS_FILE
    from ..train.experts4bit import LORA_KEY

    found = [
        (key, match) for key in state if (match := LORA_KEY.match(key.removeprefix(PEFT_PREFIX)))
    ]
    nesting = peft_nesting(leaves)
    file = Path(output) / PEFT_WEIGHTS_FILE
    tensors = load_file(str(file))
    for key, match in found:
        name = f"{match['module']}.{nesting[match['leaf']]}lora_{match['part']}.weight"
        tensors[PEFT_PREFIX + name] = state[key].detach().to("cpu").contiguous()
    save_file(tensors, str(file), metadata={"format": "pt"})
    return len(found)


def count(model: nn.Module, targets: list[str]) -> tuple[int, int, int]:
    """(elements per unit of rank, adapted parameters, in + out features a token meets) of the
    expert pairs, from the (meta) model's fused parameters: experts x (in + out) each, of which
    a token passes through its top-k experts'."""
    top_k = getattr(model.config, "num_experts_per_tok", 1) or 1
    elements = adapted = features = 0
    for name, param in model.named_parameters():
        if param.ndim == 3 and any(name.endswith(t) for t in targets):
            experts, first, second = param.shape
            elements += experts * (first + second)
            features += top_k * (first + second)
            adapted += 1
    return elements, adapted, features
