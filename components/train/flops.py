"""Model FLOPs utilisation: achieved training FLOPs over the GPUs' peak (None off GPU)."""

from __future__ import annotations

import torch


def train_flops_per_token(model, total: int, trainable: int, seq: int) -> float:
    """Forward 2N, backward 2N for activations (+2N' for trained weights), plus attention
    (12 * layers * hidden * seq: scores and values, forward and backward)."""
    config = getattr(model, "config", None)
    layers = getattr(config, "num_hidden_layers", 0) or 0
    hidden = getattr(config, "hidden_size", 0) or 0
    attention = 12 * layers * hidden * seq
    return 4 * total + 2 * trainable + attention


def gpu_peak(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    from ..planner.gpus import gpu_type_of

    gpu = gpu_type_of(torch.cuda.get_device_name(device))
    return gpu.bf16_flops if gpu else None


def mfu(flops_per_token: float, tokens_per_second: float, world) -> float | None:
    peak = gpu_peak(world.device)
    if peak is None:
        return None
    return flops_per_token * tokens_per_second / (peak * world.size)
