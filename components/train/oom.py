"""A CUDA out-of-memory error as one line with the plan's advice: what the plan predicted for
this GPU, what was in use, and the settings the plan says fit (smaller micro batch, gradient
checkpointing, `auto`). The rank that ran out stops with it and tells the others (the watchdog's
abort key), so every rank ends with the same line."""

from __future__ import annotations

import re

import torch

GB = 1e9


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
    )


def in_use(world, exc: BaseException) -> str:
    """What the allocator held when it failed (CUDA), else what the error itself says."""
    if world.device.type == "cuda":
        allocated = torch.cuda.memory_allocated(world.device) / GB
        reserved = torch.cuda.memory_reserved(world.device) / GB
        return f"{allocated:.1f} GB allocated by tensors, {reserved:.1f} GB reserved"
    asked = re.search(r"Tried to allocate ([0-9.]+ [KMGT]i?B)", str(exc))
    return f"it tried to allocate {asked.group(1)}" if asked else "not measured"


def _planned(cfg, world, memory: float | None, micro, checkpointing, rows: int):
    from ..planner.plan import estimate

    train = cfg.train.model_copy(
        update={"micro_batch_size": micro, "gradient_checkpointing": checkpointing}
    )
    plan = estimate(cfg.model_copy(update={"train": train}), world.size, None, memory, rows)
    return plan.fit


def advice(cfg, fit, world, rows_per_rank: int) -> str:
    """The settings the plan says fit this GPU, each with its predicted peak."""
    from ..planner.plan import gpu_memory_bytes

    memory = gpu_memory_bytes(cfg)
    if memory is None and world.device.type == "cuda":
        memory = float(torch.cuda.get_device_properties(world.device).total_memory)
    if memory is None:
        return "set hardware.gpu so that the plan can size the run"
    options = []
    micro = fit.micro_batch_size
    if micro > 1:
        half = _planned(
            cfg, world, memory, max(1, micro // 2), fit.checkpointing_setting, rows_per_rank
        )
        options.append(f"train.micro_batch_size={half.micro_batch_size} ({half.planned_gb:.1f} GB)")
    if fit.checkpointed_layers < fit.layers:
        every = _planned(cfg, world, memory, micro, True, rows_per_rank)
        options.append(f"train.gradient_checkpointing=true ({every.planned_gb:.1f} GB)")
    auto = _planned(cfg, world, memory, "auto", "auto", rows_per_rank)
    options.append(
        f"train.micro_batch_size=auto and gradient_checkpointing=auto (the plan picks micro "
        f"batch {auto.micro_batch_size} with {auto.checkpointed_layers} of {auto.layers} layers "
        f"checkpointed: {auto.planned_gb:.1f} GB)"
    )
    return "; ".join(options)


def oom_line(cfg, fit, world, step: int, exc: BaseException, rows_per_rank: int) -> str:
    planned = "no plan" if fit.planned_gb is None else f"{fit.planned_gb:.1f} GB"
    budget = "" if fit.budget_gb is None else f" of the {fit.budget_gb:.1f} GB it allows"
    try:
        fits = advice(cfg, fit, world, rows_per_rank)
    except Exception as exc2:  # the advice is a courtesy; the line still says what happened
        fits = f"the plan could not be asked ({str(exc2).splitlines()[0]})"
    setting = (
        f"micro batch {fit.micro_batch_size}, {fit.checkpointed_layers} of {fit.layers} layers "
        "checkpointed"
    )
    return (
        f"step {step}: rank {world.rank} ran out of GPU memory ({in_use(world, exc)}); the plan "
        f"predicted {planned}{budget} per GPU for {setting}. Settings the plan fits: {fits}. "
        "Against fragmentation: PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True"
    )
