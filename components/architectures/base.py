"""What kubetune knows about a model family, as one record (`Family`), and the generic record
any `AutoModelForCausalLM` with plain linear layers gets.

A record answers every question the worker, the planner and the methods ask of an
architecture: where its decoder layers are, which linear layers `lora.target_modules: auto`
adapts, which weights a 4-bit base keeps unquantized and why, which fused kernels and
attention features it has, how LLaMA-Adapter reaches its queries, the shipped configs of the
recipes' hub models (planning without a download) and its `tiny://` builders. A new family is
one module beside this one plus its line in `__init__.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn


# What a 4-bit base keeps in the compute dtype in every family, as QLoRA's paper and
# bitsandbytes' integration do: the output head (its logits feed the loss directly), the
# embedding tables, and every 1-D weight (norms, biases). A record's `unquantized` names what
# else its family keeps and why (a router); any other weight left unquantized fails the run.
ALWAYS_UNQUANTIZED = "the output head, embedding tables, norms and biases"


# The tiny models' scale (tiny://): 2 layers, hidden 64, 4 query heads of 16 over 2 key/value
# heads, MLP 128; each family's builder keeps what makes it different.
TINY_SHAPE = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "intermediate_size": 128,
}


def layers_by_no_split_modules(model: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks (FSDP's wrapping unit), found by the model's own
    `_no_split_modules` class names."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    inner = model
    while not names and hasattr(inner, "base_model") and inner.base_model is not inner:
        inner = inner.base_model
        names = set(getattr(inner, "_no_split_modules", None) or [])
    if not names:
        inner = getattr(getattr(model, "base_model", model), "model", model)
        names = set(getattr(inner, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


def linear_layer_names(model: nn.Module) -> list[str]:
    """Every linear layer a 4-bit model quantizes: all nn.Linear (and subclasses such as
    FalconLinear) except the output head (ALWAYS_UNQUANTIZED)."""
    from torch import nn

    head = model.get_output_embeddings()
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and module is not head
    ]


def quantized_linear_names(model: nn.Module) -> list[str]:
    """The linear layers a 4-bit base quantizes: linear_layer_names, less those the family
    record keeps in the compute dtype (`unquantized`, by their weight's name)."""
    from . import family

    kept = tuple(
        key.removesuffix(".weight")
        for key in family(model.config.model_type).unquantized
        if key.endswith(".weight")
    )
    return [name for name in linear_layer_names(model) if not (kept and name.endswith(kept))]


def transformers_flex(config) -> bool:
    """transformers' own flex_attention path for the architecture."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    model_class = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)
    return bool(getattr(model_class, "_supports_flex_attn", False))


FLEX = "flex_attention"


def auto_attention(packed: bool, flex: bool, fallback: str) -> str:
    """What `model.attn_implementation: auto` runs on CUDA where no flash-attention is
    installed, for the worker (train/attention.py) and the plan (planner/forecast.py) alike:
    flex_attention for packed rows where the family has a document-masked flex path, else the
    family's fallback (SDPA; eager where transformers has no SDPA path for it)."""
    return FLEX if packed and flex else fallback


@dataclass(frozen=True)
class Family:
    """One model family (see the module docstring). `model_types`: the config.json model_type
    values it covers, in the order error messages list them."""

    name: str
    model_types: tuple[str, ...]
    # lora.target_modules: auto. None: no automatic choice (the generic record)
    lora_targets: tuple[str, ...] | None = None
    # beyond ALWAYS_UNQUANTIZED: parameter-name suffix -> why a 4-bit base keeps it in the
    # compute dtype (every other weight is quantized, or the run fails)
    unquantized: dict[str, str] = field(default_factory=dict)
    liger: bool = False  # Liger kernels patch this family
    gated_mlp: bool = True  # SwiGLU-style gate and up projections (the planner's activations)
    # mixture-of-experts: the router modules' name suffix (their logits: the load-balancing
    # loss and the experts' load, train/moe.py); None for a dense family
    router: str | None = None
    # a MoE family whose fused experts are SwiGLU (gate_up, down): QLoRA quantizes each expert
    # (train/experts4bit.py); the checkpoint's names of an expert's gate, up and down weights
    experts_4bit: tuple[str, str, str] | None = None
    # a MoE family: its fused expert parameters that LoRA adapts under `auto` and `all-linear`
    # (peft's target_parameters; methods/expert_lora.py), as suffixes of their names
    expert_lora: tuple[str, ...] = ()
    # its fused experts are stored experts x in x out (gpt-oss), not experts x out x in
    experts_transposed: bool = False
    # the attention without flash or flex kernels (SDPA; eager where transformers has no SDPA
    # path for the family: gpt-oss's sinks)
    attention_fallback: str = "sdpa"
    # checkpoint key fragment -> the model's (a hub checkpoint's older module names)
    checkpoint_renames: dict[str, str] = field(default_factory=dict)
    # LLaMA-Adapter: (module computing the queries, output projection) of its attention
    adapter_attention: tuple[str, str] | None = None
    # document masks for packed rows: flex_attention, where this says so for the config
    flex_attention: Callable = transformers_flex
    # what transformers builds the model with when the worker runs flex_attention
    flex_build: str = "flex_attention"
    # installs kubetune's own flex forward on a built model (None: transformers' is used)
    install_flex: Callable[[nn.Module], None] | None = None
    configs: dict[str, dict] = field(default_factory=dict)  # recipe hub ids -> config.json
    tiny: dict[str, Callable] = field(default_factory=dict)  # tiny://NAME -> config builder
    decoder_layers: Callable[[nn.Module], list[nn.Module]] = layers_by_no_split_modules

    def lacks(self) -> list[str]:
        """The fast paths and features this record does not give (for `kubetune plan` and the
        generic record's note)."""
        missing = []
        if self.lora_targets is None:
            missing.append("lora.target_modules: auto (set all-linear or names)")
        if not self.liger:
            missing.append("Liger's fused kernels")
        if self.adapter_attention is None:
            missing.append("LLaMA-Adapter")
        return missing


GENERIC = Family(name="generic", model_types=())
