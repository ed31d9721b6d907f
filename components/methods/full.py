"""Full fine-tuning: every weight of the base trains (the bottom `train.freeze_layers` decoder
layers and the input embeddings excepted, as llama-recipes' num_freeze_layers); the output is a
whole model folder, with nothing to merge."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from ..artifacts import ModelKind
from ..errors import UserError
from .base import Counts, Method

if TYPE_CHECKING:
    from torch import nn

    from ..config import RunConfig


def freeze_bottom(model, layers: int) -> None:
    """Full fine-tuning of the top layers only: the input embeddings (and an output head tied
    to them) and the first `layers` decoder layers stop training."""
    if not layers:
        return
    from ..architectures import decoder_layers

    blocks = decoder_layers(model)
    if layers >= len(blocks):
        raise UserError(
            f"train.freeze_layers={layers}: the model has {len(blocks)} decoder layers; "
            "at least one must train"
        )
    model.get_input_embeddings().requires_grad_(False)
    for block in blocks[:layers]:
        block.requires_grad_(False)


class Full(Method):
    name = "full"
    kind = ModelKind.FULL
    trains_base = True
    # lit-llama finetune/full.py
    published: ClassVar[dict[str, Any]] = {"train.lr": 3e-5, "train.weight_decay": 0.0}

    def adapt(self, cfg: RunConfig, model: nn.Module, fused_lora: bool) -> nn.Module:
        freeze_bottom(model, cfg.train.freeze_layers)
        return model

    def count(self, cfg: RunConfig, model: nn.Module, linears: list[str]) -> Counts:
        counts = Counts(frozen_layers=cfg.train.freeze_layers)
        if cfg.train.freeze_layers:
            freeze_bottom(model, cfg.train.freeze_layers)
            frozen = {id(p): p.numel() for p in model.parameters() if not p.requires_grad}
            counts.frozen = sum(frozen.values())
        return counts

    def trained_params(self, arch) -> int:
        return arch.total_params

    def trainable_bytes(self, cfg: RunConfig, arch, dtype_bytes: int) -> tuple[float, float]:
        trained = arch.total_params - arch.frozen_params
        return trained * dtype_bytes, trained * 2 * dtype_bytes

    def checkpoint_bytes(self, arch) -> float:
        return self.trained_params(arch) * (2 + 8)

    def merge(self, cfg: RunConfig, trained: Path, output: Path, overwrite: bool) -> dict | None:
        return None  # the trained folder is the whole model
