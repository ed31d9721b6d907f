"""Measuring a run from the inside: one step's FLOPs and PyTorch profiler traces.

`train.flop_counter`: the optimizer step `start_step` runs under `torch.utils.flop_counter`'s
FlopCounterMode (every aten matmul, convolution and attention of forward, recomputation and
backward on this process), and the step after it is timed without the counter (the counter's
dispatch overhead would slow the step it counts). metrics.json's `flop_counter` then holds the
measured FLOPs per token beside the analytic estimate (`flops.py`), and the TFLOP/s and MFU
each gives at the timed step's speed.

`train.profile`: `torch.profiler` with the wait/warmup/active schedule, traces written by every
process into OUTPUT/tensorboard/profile/ (TensorBoard's profiler plugin or chrome://tracing).
"""

from __future__ import annotations

import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import UserError
from .flops import gpu_peak

if TYPE_CHECKING:
    from ..config import RunConfig


def check_fits(cfg: RunConfig, steps: int) -> None:
    """Both measurements must end inside the steps the run takes (checked before training)."""
    counter, profile = cfg.train.flop_counter, cfg.train.profile
    if counter is not None and counter.start_step + 1 > steps:
        raise UserError(
            f"train.flop_counter.start_step={counter.start_step}: the run has {steps} steps; "
            "the counted step and the timed step after it must both be in it"
        )
    if profile is not None and profile.wait + profile.warmup + profile.active > steps:
        need = profile.wait + profile.warmup + profile.active
        raise UserError(
            f"train.profile needs {need} steps (wait {profile.wait} + warmup {profile.warmup} "
            f"+ active {profile.active}); the run has {steps}"
        )


class StepFlops:
    """Counts step `start_step`'s FLOPs and times the step after it."""

    def __init__(self, cfg: RunConfig, world, synchronize):
        counter = cfg.train.flop_counter
        self.start = counter.start_step if counter is not None else None
        self.world, self.synchronize = world, synchronize
        self.flops: int | None = None
        self.tokens: int | None = None
        self.seconds: float | None = None
        self.timed_tokens: int | None = None

    def around(self, done: int):
        """The context for optimizer step number `done` (1-based)."""
        if self.start is None:
            return nullcontext()
        if done == self.start:
            return self._count()
        if done == self.start + 1 and self.flops is not None:
            return self._time()
        return nullcontext()

    @contextmanager
    def _count(self):
        from torch.utils.flop_counter import FlopCounterMode

        mode = FlopCounterMode(display=False)
        with mode:
            yield
        self.flops = int(mode.get_total_flops())

    @contextmanager
    def _time(self):
        self.synchronize(self.world)
        began = time.perf_counter()
        yield
        self.synchronize(self.world)
        self.seconds = time.perf_counter() - began

    def tokens_of(self, done: int, tokens: int) -> None:
        if done == self.start:
            self.tokens = int(tokens)
        elif self.start is not None and done == self.start + 1:
            self.timed_tokens = int(tokens)

    def report(self, analytic_per_token: float) -> dict | None:
        if self.flops is None or self.seconds is None or not self.tokens:
            return None  # resumed past the counted step
        assert self.start is not None and self.timed_tokens is not None, "the timed step ran"
        per_token = self.flops / self.tokens
        rate = self.timed_tokens / self.seconds  # tokens/s of this process at the timed step
        peak = gpu_peak(self.world.device)
        return {
            "counted_step": self.start,
            "flops": self.flops,
            "tokens": self.tokens,
            "flops_per_token": per_token,
            "analytic_flops_per_token": analytic_per_token,
            "timed_step": self.start + 1,
            "timed_seconds": round(self.seconds, 6),
            "tflops_per_second": per_token * rate / 1e12,
            "analytic_tflops_per_second": analytic_per_token * rate / 1e12,
            "mfu": per_token * rate / peak if peak else None,
            "analytic_mfu": analytic_per_token * rate / peak if peak else None,
        }


def start_profiler(cfg: RunConfig, world, output: Path, steps_left: int):
    """A started torch.profiler with the recipe's schedule, or None (also when a resumed run
    has fewer steps left than the schedule needs: resuming must not fail over a trace)."""
    settings = cfg.train.profile
    if settings is None:
        return None
    if settings.wait + settings.warmup + settings.active > steps_left:
        if world.main:
            print(f"train.profile: only {steps_left} steps left after resuming; no trace")
        return None
    from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler

    activities = [ProfilerActivity.CPU]
    if world.device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    profiler = profile(
        activities=activities,
        schedule=schedule(
            wait=settings.wait, warmup=settings.warmup, active=settings.active, repeat=1
        ),
        on_trace_ready=tensorboard_trace_handler(
            str(output / "tensorboard" / "profile"), worker_name=f"rank{world.rank}"
        ),
        record_shapes=True,
        profile_memory=True,
    )
    profiler.start()
    return profiler
