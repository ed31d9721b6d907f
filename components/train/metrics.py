"""What a training run reports: the `step N/M ...` progress lines (and the TrainJob's status)
as it goes, and metrics.json at the end (TrainMetrics)."""

from __future__ import annotations

import resource
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch

from ..artifacts import (
    ProgressLine,
)
from .parallel import (
    World,
    fsdp_layout,
)
from .progress import LossLog
from .status import Figures

if TYPE_CHECKING:
    from ..config import RunConfig


@dataclass
class TrainMetrics:
    """metrics.json of a training run, in its key order (rank 0 writes it last: it marks a
    finished run). Speeds are None for a run resumed at its last step."""

    steps: int
    resumed_from_step: int
    loss: list  # [step, mean loss over ranks]
    tokens_per_second: float | None
    # this process's computed (padded) tokens and dataset examples, times the ranks
    padded_tokens_per_second: float | None
    examples_per_second: float | None
    samples_per_second: float | None
    steady_tokens_per_second: float | None  # without the first WARMUP_STEPS steps
    trainable_params: int
    total_params: int
    quantized_linear_modules: int
    flop_counter: dict | None
    method: str
    strategy: str
    fsdp: dict | None
    world_size: int
    device: str
    attn_implementation: str
    kernels: dict
    gradient_checkpointing: dict
    micro_batch: dict
    precision: dict
    train_seconds: float
    dataset_fingerprint: str | None
    eval_loss: float | None = None  # after the last step
    # the objective's metrics on the eval split after the last step (preference objectives:
    # rewards_chosen, rewards_rejected, reward_accuracy, reward_margin, logps_*), weighted as
    # its loss; and at each train.eval_steps evaluation before it
    eval_metrics: dict | None = None
    eval_history: list | None = None
    objective: str = "sft"
    reference: str | None = None  # dpo/ipo: live or precomputed (train/reference.py)
    peak_memory_bytes: int | None = None
    mfu: float | None = None
    prediction: dict | None = None  # the speed model's, beside what the run measured
    deepspeed: dict | None = None  # what DeepSpeed's engine ran (deepspeed_record)
    # the objective's own metrics, {name: [[step, mean over ranks], ...]} (a MoE model's
    # router_aux_loss and expert load); None when it logs none
    objective_metrics: dict | None = None
    # a MoE model: every expert's token count per MoE layer over the run, all ranks (train/moe.py)
    expert_tokens: list | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def peak_memory(world: World) -> int:
    if world.device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(world.device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def print_losses(
    landed, every: int, steps: int, start: int, log: LossLog, elapsed: float, status=None
):
    """The `step N/M loss X ... progress P% eta T` lines of the logging steps among the losses
    that just landed; the same figures go to the TrainJob's status (`status`, at most every
    5 s, and always the last step's)."""
    for step, loss, lr in landed:
        if step % every == 0 or step == steps:
            figures = Figures.of(step, steps, start, loss, log.tokens, elapsed)
            line = ProgressLine(
                step, steps, loss, lr, figures.tokens_per_second, figures.percent, figures.eta()
            )
            print(line.format(), flush=True)
            if status is not None:
                status.report(figures, force=step == steps)


def precision_record(model) -> dict:
    """The dtypes of the frozen and the trainable tensors, by element count (4-bit weights
    count as their packed storage dtype)."""
    frozen: dict[str, int] = {}
    trained: dict[str, int] = {}
    seen = set()
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        table = trained if p.requires_grad else frozen
        name = str(p.dtype).removeprefix("torch.")
        table[name] = table.get(name, 0) + p.numel()
    return {"frozen": frozen, "trainable": trained}


def deepspeed_record(model) -> dict | None:
    """What DeepSpeed ran, read from its engine and ZeRO optimizer rather than from the config
    kubetune handed it: the ZeRO stage, the optimizer wrapper's class, and whether the fp32
    optimizer state and (stage 3) the parameters were really offloaded to the CPU."""
    if not hasattr(model, "zero_optimization_stage"):
        return None
    optimizer = getattr(model, "optimizer", None)
    stage = int(model.zero_optimization_stage())
    if stage == 3:
        offload_optimizer = bool(getattr(optimizer, "offload_optimizer", False))
        offload_param = bool(getattr(optimizer, "offload_param", False))
    else:
        offload_optimizer = bool(getattr(optimizer, "cpu_offload", False))
        offload_param = False
    return {
        "zero_stage": stage,
        "optimizer": type(optimizer).__name__,
        "offload_optimizer": offload_optimizer,
        "offload_param": offload_param,
    }


def fsdp_record(cfg: RunConfig, model) -> dict | None:
    """What metrics.json and checkpoints record of FSDP: the options and the mesh that ran."""
    if cfg.distributed.strategy != "fsdp":
        return None
    fsdp = cfg.distributed.fsdp
    return {
        "sharding": fsdp.sharding,
        "cpu_offload": fsdp.cpu_offload,
        **(fsdp_layout(model) or {}),
    }
