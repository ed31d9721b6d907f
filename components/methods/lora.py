"""LoRA and QLoRA (peft): low-rank A/B matrices beside the targeted linear layers of a bf16
base (`lora`) or of a base quantized to 4 or 8 bits by bitsandbytes (`qlora`, loaded by
train/modeling.py's load_quantized). The adapter's weights are fp32 master weights."""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, ClassVar

from ..artifacts import ModelKind
from ..errors import UserError
from .base import Counts, Method

if TYPE_CHECKING:
    from torch import nn

    from ..config import RunConfig


def quantized_bytes(bits: int, double_quant: bool = True) -> float:
    """Bytes per weight stored in 8 bits, or in NF4/FP4 with its absmax constants (per 64
    weights: fp32, or 8 bits with double quantization plus an fp32 constant per 256 blocks)."""
    if bits == 8:
        return 1.0
    return 0.5 + (1 / 64 + 4 / (64 * 256) if double_quant else 4 / 64)


def lora_targets(cfg: RunConfig, model_type: str) -> list[str] | str:
    """lora.target_modules, with auto resolved by the model's family record."""
    from ..architectures import family

    targets = cfg.lora.target_modules
    if targets == "auto":
        auto = family(model_type).lora_targets
        if auto is None:
            raise UserError(
                f"lora.target_modules: no automatic choice for model type "
                f"{model_type!r}; set all-linear or a list of module names"
            )
        return list(auto)
    return targets


def prepare_kbit(model: nn.Module) -> None:
    """The 4-bit (or 8-bit) base ready for adapters: every weight frozen, and every weight that
    is not quantized (embeddings, norms, the head) left in quant.compute_dtype.

    This replaces peft's prepare_model_for_kbit_training, which upcasts those weights to fp32:
    then the residual stream, attention, the output head's GEMM and the LoRA matmuls all run
    in fp32. Here only the adapter's own weights (and their AdamW state) are fp32 master
    weights; the forward runs in the compute dtype."""
    model.requires_grad_(False)


def add_lora(cfg: RunConfig, model: nn.Module) -> nn.Module:
    """LoRA (peft) on the base; adapter weights in fp32, the base in its own dtype. On a MoE
    family, `auto` and `all-linear` reach the routed experts too (methods/expert_lora.py)."""
    from peft import LoraConfig, get_peft_model

    from ..architectures import family
    from . import expert_lora, method_of

    quantized = method_of(cfg).quantized_base
    if quantized:
        prepare_kbit(model)
    record = family(model.config.model_type)
    experts = expert_lora.expert_targets(cfg, record)
    expert_lora.check_dropout(cfg, experts)
    targets = lora_targets(cfg, model.config.model_type)
    if experts and targets == "all-linear":
        targets = expert_lora.linear_targets(model, record)
    lora = LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=targets,
        # a 4-bit base's experts are bitsandbytes layers peft cannot wrap: their pairs are
        # added below, in the same layout, and named in adapter_config.json afterwards
        target_parameters=None if quantized else experts or None,
        bias=cfg.lora.bias,
        use_rslora=cfg.lora.use_rslora,
        task_type="CAUSAL_LM",
    )
    try:
        # autocast_adapter_dtype: peft keeps the adapter's weights in fp32 (master weights)
        peft_model = get_peft_model(model, lora, autocast_adapter_dtype=True)
    except ValueError as exc:
        raise UserError(f"lora.target_modules: {exc}") from None
    if quantized and experts:
        expert_lora.adapt_quantized_experts(cfg, peft_model, experts)
        peft_model.peft_config["default"].target_parameters = experts
    return peft_model


class LoRA(Method):
    name = "lora"
    kind = ModelKind.LORA
    lora_matmuls = True
    switches_off = True
    # lit-parrot / lit-llama finetune/lora.py
    published: ClassVar[dict[str, Any]] = {"train.lr": 3e-4, "train.weight_decay": 0.0}

    @contextmanager
    def reference(self, model: nn.Module):
        """peft's adapters off, and the 4-bit experts' own pairs (train/experts4bit.py)."""
        from ..train.experts4bit import Experts4bit

        experts = [m for m in model.modules() if isinstance(m, Experts4bit)]
        with model.disable_adapter():
            for module in experts:
                module.lora_off = True
            try:
                yield
            finally:
                for module in experts:
                    module.lora_off = False

    def adapt(self, cfg: RunConfig, model: nn.Module, fused_lora: bool) -> nn.Module:
        model = add_lora(cfg, model)
        if fused_lora:
            from ..train.fused_lora import fuse_lora

            fuse_lora(model)
        return model

    def check_model(self, cfg: RunConfig) -> None:
        """A MoE model's experts are adapted without dropout (peft's parameter LoRA)."""
        from ..architectures import family
        from ..models import load_config
        from . import expert_lora

        record = family(load_config(cfg.model).model_type)
        expert_lora.check_dropout(cfg, expert_lora.expert_targets(cfg, record))

    def save(self, cfg: RunConfig, model: nn.Module, state: dict | None, output) -> None:
        """peft's adapter files; a 4-bit base's expert pairs (which peft does not see: they are
        not its layers) added to them under the names peft gives them on the stock model, so
        the adapter loads there."""
        from . import expert_lora

        super().save(cfg, model, state, output)
        targets = model.peft_config["default"].target_parameters or ()
        if self.quantized_base and targets:
            from ..architectures import family

            leaves = expert_lora.model_order(targets, family(model.config.model_type))
            expert_lora.add_to_adapter(
                output, model.state_dict() if state is None else state, leaves
            )

    def count(self, cfg: RunConfig, model: nn.Module, linears: list[str]) -> Counts:
        targets = lora_targets(cfg, model.config.model_type)
        counts = Counts()
        for name in linears:
            if targets == "all-linear" or name.rsplit(".", 1)[-1] in targets:
                module = model.get_submodule(name)
                features = module.in_features + module.out_features
                counts.trainable += cfg.lora.r * features
                counts.adapted_modules += 1
                counts.adapted_features += features
        from ..architectures import family
        from . import expert_lora

        experts = expert_lora.expert_targets(cfg, family(model.config.model_type))
        elements, adapted, features = expert_lora.count(model, experts)
        counts.trainable += cfg.lora.r * elements
        counts.routed_trainable += cfg.lora.r * elements
        counts.adapted_modules += adapted
        counts.adapted_features += features
        return counts


class QLoRA(LoRA):
    name = "qlora"
    quantized_base = True
    # the QLoRA paper (Dettmers et al. 2023), 7B and 13B models
    published: ClassVar[dict[str, Any]] = {"train.lr": 2e-4, "train.weight_decay": 0.0}

    def validate(self, cfg: RunConfig) -> None:
        super().validate(cfg)
        if cfg.distributed.strategy == "deepspeed":
            raise ValueError(
                "method=qlora runs with distributed.strategy=ddp (a 4-bit replica per GPU) "
                "or fsdp (the 4-bit base sharded per decoder layer), not deepspeed"
            )
        if cfg.distributed.fsdp.cpu_offload:
            raise ValueError(
                "distributed.fsdp.cpu_offload: a 4-bit base stays on the GPU (bitsandbytes "
                "quantizes there); offload with method=lora or full"
            )

    def weight_bytes(self, cfg: RunConfig, arch, dtype_bytes: int) -> float:
        other = arch.total_params - arch.linear_params
        per = quantized_bytes(cfg.quant.bits, cfg.quant.double_quant)
        return arch.linear_params * per + other * (4 if cfg.quant.compute_dtype == "float32" else 2)
