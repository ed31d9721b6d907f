"""LLaMA-Adapter (`adapter`) and LLaMA-Adapter v2 (`adapter_v2`): kubetune's own modules
(llama_adapter.py) of learned prompts and per-head gates, plus v2's linear-layer bias and scale
and trained norms. The output is `adapter.safetensors` with `kubetune_adapter.json`."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from ..artifacts import ModelKind
from .base import Counts, Method

if TYPE_CHECKING:
    from torch import nn

    from ..config import RunConfig


class Adapter(Method):
    name = "adapter"
    kind = ModelKind.PROMPTS
    switches_off = True
    prompts_only = True  # trains only the prompts and gates of the layers from start_layer up
    # lit-parrot / lit-llama finetune/adapter.py (the LLaMA-Adapter paper's 9e-3)
    published: ClassVar[dict[str, Any]] = {"train.lr": 9e-3, "train.weight_decay": 0.02}

    def check_model(self, cfg: RunConfig) -> None:
        from ..models import load_config
        from .llama_adapter import check_architecture

        check_architecture(cfg.method, load_config(cfg.model), cfg.adapter.start_layer)

    @contextmanager
    def reference(self, model: nn.Module):
        """Every layer's learned prompt off (LLaMA-Adapter v1 changes nothing else)."""
        from .llama_adapter import Prefix

        prefixes = [m for m in model.modules() if isinstance(m, Prefix)]
        for prefix in prefixes:
            prefix.off = True
        try:
            yield
        finally:
            for prefix in prefixes:
                prefix.off = False

    def adapt(self, cfg: RunConfig, model: nn.Module, fused_lora: bool) -> nn.Module:
        from .llama_adapter import AdapterSpec, install

        install(model, AdapterSpec.from_recipe(cfg))
        return model

    def save(self, cfg: RunConfig, model: nn.Module, state: dict | None, output: Path) -> None:
        from .llama_adapter import AdapterSpec, save

        # only the trained tensors (FSDP's state dict also names a head tied to frozen inputs)
        trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
        state = {k: v for k, v in state.items() if k in trained} if state else trained
        save(output, AdapterSpec.from_recipe(cfg), state)

    def count(self, cfg: RunConfig, model: nn.Module, linears: list[str]) -> Counts:
        from .llama_adapter import AdapterSpec, install, trainable_count

        install(model, AdapterSpec.from_recipe(cfg))  # on the meta model, counted
        # below its first prompt nothing trains (v1), so the backward stops there
        frozen = cfg.adapter.start_layer if self.prompts_only else 0
        return Counts(trainable=trainable_count(model), frozen_layers=frozen)


class AdapterV2(Adapter):
    name = "adapter_v2"
    # its head has its own bias and scale, which only the head's own forward applies
    head_forward = True
    switches_off = False  # it trains the base's norms: switched off is not the base
    prompts_only = False  # every layer's norms and linear scales train too
    # lit-parrot finetune/adapter_v2.py
    published: ClassVar[dict[str, Any]] = {"train.lr": 9e-3, "train.weight_decay": 0.02}
