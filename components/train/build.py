"""The model a training run trains, before the loop: the fitted micro batch and checkpointing
(fit_run), the base model with its kernels, adapter or LoRA and checkpointed layers
(build_model), then sharded and given its optimizer and schedule (wrap)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..architectures import decoder_layers, family_note
from ..config import RunConfig
from ..errors import UserError
from ..methods import method_of
from ..objectives import objective_of
from ..planner.fit import Fit, as_set
from ..planner.kernel_choice import Kernels, select_kernels
from . import checkpoint as ckpt
from .attention import FLEX, use_flex_attention, windowed_masks
from .kernels import apply_kernels, compile_layers, use_token_logps
from .linear_attention import split_by_document
from .meta_load import materialize
from .modeling import (
    DTYPES,
    apply_checkpointing,
    build_on_meta,
    load_base,
    parameter_counts,
    weights_dtype,
)
from .moe import install as install_router_watch
from .parallel import (
    World,
    deepspeed_config,
    no_shm_op_on_cpu,
    wrap_ddp,
    wrap_fsdp,
)


def lr_lambda(cfg: RunConfig, steps: int):
    warmup = cfg.train.warmup_steps

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        if cfg.train.lr_scheduler == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        if cfg.train.lr_scheduler == "linear":
            return max(0.0, 1.0 - progress)
        return 1.0

    return factor


def low_memory_fsdp(cfg: RunConfig) -> bool:
    """FSDP lora/full with distributed.low_memory_load: build on meta, rank 0 streams weights."""
    return (
        cfg.distributed.strategy == "fsdp"
        and cfg.distributed.low_memory_load
        and not method_of(cfg).quantized_base
    )


def is_zero3(cfg: RunConfig) -> bool:
    return cfg.distributed.strategy == "deepspeed" and cfg.distributed.zero_stage == 3


def unwrap(model):
    return model.module if hasattr(model, "module") else model


def trainable_named(model) -> dict:
    return {n: p for n, p in unwrap(model).named_parameters() if p.requires_grad}


def fit_run(cfg: RunConfig, world: World, rows: int, output: Path) -> Fit:
    """The micro batch and the checkpointed layers (fit.py), from the plan on this GPU. A
    resumed run keeps the micro batch and grad_accum its checkpoint was written with: the
    data order depends on them."""
    from ..planner.plan import estimate

    memory = None
    if world.device.type == "cuda":
        memory = float(torch.cuda.get_device_properties(world.device).total_memory)
    train = cfg.train
    latest = ckpt.latest_checkpoint(output)
    if latest is not None and train.micro_batch_size == "auto":
        try:
            state = ckpt.read_state(latest)
        except (OSError, ValueError):  # a damaged checkpoint: resume() sets it aside
            state = {}
        if "micro_batch_size" in state:
            train = train.model_copy(
                update={
                    "micro_batch_size": state["micro_batch_size"],
                    "grad_accum": state["grad_accum"],
                }
            )
            cfg = cfg.model_copy(update={"train": train})
    dtype_bytes = 4 if weights_dtype(cfg, world.device) == torch.float32 else 2
    try:
        fit = estimate(cfg, world.size, dtype_bytes, memory, rows // world.size).fit
        assert fit is not None, "estimate() fits the run it is given rows for"
        return fit
    except Exception as exc:  # an architecture the plan cannot build on the meta device
        if "auto" in (train.micro_batch_size, train.gradient_checkpointing):
            raise UserError(
                f"train.micro_batch_size / train.gradient_checkpointing: auto needs kubetune's "
                f"memory plan, which failed for this model ({exc}); set them explicitly"
            ) from None
        from ..models import load_config

        return as_set(cfg, load_config(cfg.model).num_hidden_layers, str(exc).splitlines()[0])


@dataclass
class BuiltModel:
    """What build_model returns: the model (not yet sharded) and what the run records of it."""

    model: nn.Module
    quantized: int  # linear layers stored in 4 or 8 bits
    trainable: int  # parameters
    total: int
    dtype: torch.dtype  # of the weights that are not quantized
    ds_config: dict | None  # DeepSpeed's config, with distributed.strategy=deepspeed
    kernels: Kernels


def patched_base(cfg: RunConfig, world: World, attn: str, dtype: torch.dtype, zero3: bool):
    """(the base model, its quantized linear layers) with what its family needs to train on
    packed rows, before kernels and the method: loaded (on the meta device for low-memory
    FSDP), its routers watched, sliding windows and linear-attention documents kept apart,
    flex_attention's document masks. The policy and a frozen reference copy load alike."""
    if low_memory_fsdp(cfg):
        model, quantized = build_on_meta(cfg, dtype, attn), 0
    else:
        model, quantized = load_base(cfg, world.device, deepspeed_zero3=zero3, attn=attn)
    install_router_watch(model)  # a MoE model: its routers' load-balancing loss and load
    windowed_masks(model)  # a sliding-window family: packed rows keep its windows
    split_by_document(model)  # linear-attention layers: a packed row's examples run apart
    if attn == FLEX:
        use_flex_attention(model)
    return model, quantized


def with_kernels(cfg: RunConfig, model, kernels: Kernels) -> None:
    """The chosen kernels on the (unwrapped) base, and for a preference objective the forward
    that returns answer log-probabilities, chunked through the head where the loss is."""
    apply_kernels(model, kernels)
    if objective_of(cfg).data_format == "preference":
        use_token_logps(model, chunked=kernels.loss != "transformers")


def build_model(cfg: RunConfig, world: World, attn: str, fit: Fit, packed: bool) -> BuiltModel:
    """Base model (+ kernels, + LoRA or adapters, + checkpointing, + compiled layers), not yet
    sharded. Frozen weights stay in the compute dtype; trainable LoRA/adapter weights are
    fp32 (master weights) for lora/qlora/adapters."""
    zero3 = is_zero3(cfg)
    dtype = weights_dtype(cfg, world.device)
    ds_config = None
    if cfg.distributed.strategy == "deepspeed":
        no_shm_op_on_cpu(world)
        ds_config = deepspeed_config(cfg, world, dtype == torch.bfloat16)
    hf_ds = None
    if zero3:  # transformers then builds the model straight into ZeRO-3 partitions
        from transformers.integrations import HfDeepSpeedConfig

        hf_ds = HfDeepSpeedConfig(ds_config)  # noqa: F841 (must stay alive while loading)
    model, quantized = patched_base(cfg, world, attn, dtype, zero3)
    note = family_note(model.config.model_type)
    if note and world.main:
        print(note, flush=True)
    kernels = select_kernels(cfg, world.device, model.config.model_type, packed)
    with_kernels(cfg, model, kernels)
    model = method_of(cfg).adapt(cfg, model, fused_lora=kernels.lora == "fused")
    layers = decoder_layers(model)
    apply_checkpointing(model, layers, fit.checkpointed_layers)
    model.config.use_cache = False
    if kernels.compile:
        compile_layers(layers, log=print if world.main else (lambda message: None))
    trainable, total = parameter_counts(model)
    return BuiltModel(model, quantized, trainable, total, dtype, ds_config, kernels)


def wrap(cfg: RunConfig, model, world: World, dtype, ds_config, steps: int):
    """(engine or wrapped model, optimizer, scheduler) for the strategy."""
    strategy = cfg.distributed.strategy
    if strategy == "deepspeed":
        import deepspeed

        engine, optimizer, _, scheduler = deepspeed.initialize(
            model=model,
            model_parameters=[p for p in model.parameters() if p.requires_grad],
            config=ds_config,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, steps)),
        )
        return engine, optimizer, scheduler
    if strategy == "fsdp":
        # 4-bit weights are stored in the compute dtype: gather them in it, unconverted.
        quantized = method_of(cfg).quantized_base
        param_dtype = DTYPES[cfg.quant.compute_dtype] if quantized else dtype
        dist_cfg = cfg.distributed
        model = wrap_fsdp(model, world, param_dtype, dist_cfg.fsdp, dist_cfg.procs_per_node)
        if low_memory_fsdp(cfg):
            materialize(model, cfg, world)
    elif world.size > 1:
        model = wrap_ddp(model, world)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params,
        lr=cfg.train.lr,
        weight_decay=cfg.train.weight_decay,
        fused=world.device.type == "cuda",
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, steps))
    return model, optimizer, scheduler
