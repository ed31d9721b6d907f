"""`auto` for gradient checkpointing and the micro batch: chosen from the memory plan, never by
trial and error.

The plan (`plan.py`) predicts the peak memory of a run for any micro batch and any number of
checkpointed decoder layers. A run *fits* when that prediction leaves `MARGIN` of the GPU's
memory free (allocator fragmentation, NCCL buffers, the plan's own error). Then:

- `train.gradient_checkpointing: auto` checkpoints no layer when the run fits without it, else
  the fewest decoder layers that make it fit (every layer when even that does not fit: the
  plan says so and the run may run out of memory);
- `train.micro_batch_size: auto` takes the largest micro batch (at most `MAX_AUTO_MICRO`, at
  most the rows each process gets, a divisor of the global batch) that fits without
  checkpointing when checkpointing is auto or off, with every layer checkpointed when it is
  on; when not even one row fits without checkpointing, one row with the fewest layers
  checkpointed. grad_accum follows from `train.global_batch_size` when it is set.

Without a GPU to fit (a CPU run with `hardware.gpu: none`) nothing is checkpointed and the
largest allowed micro batch is taken. The choice and its reason go to metrics.json.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..config import RunConfig

GB = 1e9
MARGIN = 0.10  # share of the GPU's memory a run that "fits" leaves free
MAX_AUTO_MICRO = 64  # rows per micro batch that `auto` goes up to


def total_steps(cfg: RunConfig, per_epoch: int) -> int:
    if cfg.train.max_steps:
        return cfg.train.max_steps
    return max(1, int(cfg.train.epochs * per_epoch) // cfg.train.grad_accum)


@dataclass(frozen=True)
class Fit:
    """What the run uses, and why (metrics.json `gradient_checkpointing` and `micro_batch`)."""

    micro_batch_size: int
    grad_accum: int
    checkpointed_layers: int
    layers: int
    micro_setting: int | str
    checkpointing_setting: bool | str
    budget_gb: float | None  # the memory a fitting run may use (GPU memory less the margin)
    planned_gb: float | None  # the plan's peak for the chosen micro batch and checkpointing
    checkpointing_reason: str
    micro_reason: str

    @property
    def checkpointing(self) -> bool:
        return self.checkpointed_layers > 0

    def checkpointing_record(self) -> dict:
        return {
            "setting": self.checkpointing_setting,
            "layers": self.checkpointed_layers,
            "of": self.layers,
            "planned_gb": None if self.planned_gb is None else round(self.planned_gb, 2),
            "budget_gb": None if self.budget_gb is None else round(self.budget_gb, 2),
            "reason": self.checkpointing_reason,
        }

    def micro_record(self, world: int) -> dict:
        return {
            "setting": self.micro_setting,
            "micro_batch_size": self.micro_batch_size,
            "grad_accum": self.grad_accum,
            "global_batch_size": self.micro_batch_size * self.grad_accum * world,
            "reason": self.micro_reason,
        }


def micro_candidates(cfg: RunConfig, world: int, rows_per_rank: int | None) -> list[int]:
    """Micro batches `auto` may take, largest first: each divides the global batch when one
    is set, none exceeds the rows a process gets per epoch."""
    cap = MAX_AUTO_MICRO
    glob = cfg.train.global_batch_size
    if glob is not None:
        cap = min(cap, glob // world)
    if rows_per_rank is not None:
        cap = min(cap, max(1, rows_per_rank))
    sizes = [m for m in range(cap, 0, -1) if glob is None or (glob // world) % m == 0]
    return sizes or [1]


def choose(
    cfg,
    total: Callable[[int, int], float],
    layers: int,
    world: int,
    memory: float | None,
    rows_per_rank: int | None = None,
) -> Fit:
    """The micro batch and checkpointed layers for cfg; `total(micro, checkpointed)` is the
    plan's peak bytes per GPU, `memory` the GPU's bytes (None: no GPU to fit)."""
    ckpt_setting, micro_setting = cfg.train.gradient_checkpointing, cfg.train.micro_batch_size
    budget = None if memory is None else memory * (1 - MARGIN)
    fixed_layers = {True: layers, False: 0}.get(ckpt_setting)  # None: auto

    def fits(micro: int, k: int) -> bool:
        return budget is None or total(micro, k) <= budget

    def fewest_layers(micro: int) -> int | None:
        return next((k for k in range(layers + 1) if fits(micro, k)), None)

    if micro_setting == "auto":
        candidates = micro_candidates(cfg, world, rows_per_rank)
        probe = fixed_layers if fixed_layers is not None else 0
        found_micro = next((m for m in candidates if fits(m, probe)), None)
        micro = found_micro or 1
        if budget is None:
            micro_reason = f"no GPU memory to fit (CPU run): the largest allowed, {micro}"
        elif found_micro is not None:
            micro_reason = (
                f"the largest micro batch the plan fits in {budget / GB:.1f} GB "
                f"({'every layer' if probe else 'no layer'} checkpointed), of at most "
                f"{candidates[0]}"
            )
        else:
            micro_reason = "not even one row fits without checkpointing: one row"
    else:
        micro, micro_reason = micro_setting, "set by the recipe"

    if fixed_layers is not None:
        checkpointed = fixed_layers
        ckpt_reason = "set by the recipe"
    elif budget is None:
        checkpointed = 0
        ckpt_reason = "no GPU memory to fit (CPU run without hardware.gpu): off"
    else:
        found = fewest_layers(micro)
        if found == 0:
            checkpointed = 0
            ckpt_reason = (
                f"the plan fits in {budget / GB:.1f} GB ({1 - MARGIN:.0%} of the GPU) "
                "without recomputation"
            )
        elif found is not None:
            checkpointed = found
            ckpt_reason = (
                f"{found} of {layers} decoder layers checkpointed: the fewest that make "
                f"the plan fit in {budget / GB:.1f} GB"
            )
        else:
            checkpointed = layers
            ckpt_reason = (
                f"the plan does not fit in {budget / GB:.1f} GB even with every layer "
                "checkpointed (the run may run out of memory)"
            )

    accum = cfg.train.grad_accum
    if micro_setting == "auto" and cfg.train.global_batch_size is not None:
        accum = cfg.train.global_batch_size // (micro * world)
    return Fit(
        micro_batch_size=micro,
        grad_accum=accum,
        checkpointed_layers=checkpointed,
        layers=layers,
        micro_setting=micro_setting,
        checkpointing_setting=ckpt_setting,
        budget_gb=None if budget is None else budget / GB,
        planned_gb=total(micro, checkpointed) / GB,
        checkpointing_reason=ckpt_reason,
        micro_reason=micro_reason,
    )


def as_set(cfg: RunConfig, layers: int, why: str) -> Fit:
    """The recipe's own fixed micro batch and checkpointing, when there is no plan to fit."""
    micro, checkpointing = cfg.train.micro_batch_size, cfg.train.gradient_checkpointing
    assert isinstance(micro, int), "auto needs the plan; the caller refuses it without one"
    return Fit(
        micro_batch_size=micro,
        grad_accum=cfg.train.grad_accum,
        checkpointed_layers=layers if checkpointing else 0,
        layers=layers,
        micro_setting=micro,
        checkpointing_setting=checkpointing,
        budget_gb=None,
        planned_gb=None,
        checkpointing_reason=f"set by the recipe (no plan: {why})",
        micro_reason=f"set by the recipe (no plan: {why})",
    )


def resolved(cfg: RunConfig, fit: Fit):
    """cfg with the chosen micro batch, grad_accum and checkpointing (every layer or none as
    a bool; the worker checkpoints `fit.checkpointed_layers` of them)."""
    train = cfg.train.model_copy(
        update={
            "micro_batch_size": fit.micro_batch_size,
            "grad_accum": fit.grad_accum,
            "gradient_checkpointing": fit.checkpointing,
        }
    )
    return cfg.model_copy(update={"train": train})
