"""The interface every training method implements (`Method`), and what the planner counts of
one (`Counts`).

A method is how weights are adapted: which base it loads (quantized or not), what it adds and
trains, what the planner counts and charges for it, what it saves and how its output merges.
Everything outside components/methods/ asks the recipe's method (`method_of(cfg)`) instead of
comparing `cfg.method` with a name."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from ..artifacts import ModelKind

if TYPE_CHECKING:
    from torch import nn

    from ..config import RunConfig


@dataclass
class Counts:
    """What a method trains of a model, counted on the meta device (planner/architecture.py)."""

    trainable: int = 0  # the adapter's parameters (LoRA, LLaMA-Adapter); 0 for full
    adapted_modules: int = 0  # linear layers LoRA adapts
    adapted_features: int = 0  # their in + out features, summed
    frozen: int = 0  # method=full with train.freeze_layers: parameters that stay frozen
    frozen_layers: int = 0
    routed_trainable: int = 0  # of `trainable`, the LoRA pairs of every routed expert


class Method:
    """One training method. Subclasses set the class attributes and override what differs;
    the defaults describe a method that trains an adapter on a bf16 base."""

    name: str = ""
    kind: ClassVar[ModelKind]  # what the trained output folder holds
    quantized_base: bool = False  # the base loads in 4 or 8 bits (bitsandbytes)
    trains_base: bool = False  # the base's own weights train (the whole model is saved)
    lora_matmuls: bool = False  # adds LoRA's A/B matmuls beside targeted linear layers
    head_forward: bool = False  # its output head must run its own forward (not a fused loss)
    # what it adds can be switched off, leaving the base model (`reference`): the reference
    # of dpo/ipo then needs no second copy of the model
    switches_off: bool = False
    # published settings for `kubetune compare` (dotted keys, as for --set)
    published: ClassVar[dict[str, Any]] = {}

    # --- the recipe ---------------------------------------------------------------------------
    def validate(self, cfg: RunConfig) -> None:
        """Settings this method cannot run with: ValueError naming the key."""
        if cfg.train.freeze_layers and not self.trains_base:
            raise ValueError(
                "train.freeze_layers needs method=full (the other methods train adapters only)"
            )

    def check_model(self, cfg: RunConfig) -> None:
        """Before any worker starts: the method fits the recipe's model (UserError if not)."""

    # --- training -----------------------------------------------------------------------------
    def adapt(self, cfg: RunConfig, model: nn.Module, fused_lora: bool) -> nn.Module:
        """The loaded base with this method's trainable parts, everything else frozen."""
        raise NotImplementedError

    def save(self, cfg: RunConfig, model: nn.Module, state: dict | None, output: Path) -> None:
        """Write the trained result (rank 0). `state`: the full state dict a sharded run
        gathered (FSDP, ZeRO-3), else None (the model's own tensors)."""
        model.save_pretrained(output, state_dict=state, safe_serialization=True)

    def reference(self, model: nn.Module):
        """A context manager inside which `model` (this method's adapted model, unwrapped)
        computes the base model's outputs: what it added switched off. Only for methods
        with `switches_off`."""
        raise NotImplementedError(f"method {self.name} cannot switch its training off")

    # --- the planner --------------------------------------------------------------------------
    def count(self, cfg: RunConfig, model: nn.Module, linears: list[str]) -> Counts:
        """What this method trains of a meta-device model whose linear layers are `linears`."""
        raise NotImplementedError

    def trained_params(self, arch) -> int:
        """Parameters with gradients and optimizer state."""
        return arch.adapter_params

    def weight_bytes(self, cfg: RunConfig, arch, dtype_bytes: int) -> float:
        """The base's weights on the GPU."""
        return arch.total_params * dtype_bytes

    def trainable_bytes(self, cfg: RunConfig, arch, dtype_bytes: int) -> tuple[float, float]:
        """(bytes that live with the weights: gradients, fp32 adapter weights; AdamW moments)."""
        return arch.adapter_params * 8, arch.adapter_params * 8

    def checkpoint_bytes(self, arch) -> float:
        """A checkpoint's size: the trained weights and their AdamW moments."""
        return self.trained_params(arch) * (4 + 8)

    # --- after training -----------------------------------------------------------------------
    def merge(self, cfg: RunConfig, trained: Path, output: Path, overwrite: bool) -> dict | None:
        """The trained adapter folded into the base, written to `output`; None when the trained
        folder is a whole model already."""
        from ..merge_adapter.step import merge

        return merge(cfg, trained, output, overwrite=overwrite)
