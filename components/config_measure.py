"""Every recipe section's base (`Section`: unknown keys refused, assignments validated), and the
measuring and guarding sections train.flop_counter, train.profile and train.spike_guard
(config_sections.py's TrainConfig holds them)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class FlopCounterConfig(Section):
    start_step: int = Field(
        3,
        gt=0,
        description="The optimizer step whose FLOPs torch.utils.flop_counter counts (after the "
        "first steps' compiles); the step after it is timed for TFLOP/s.",
    )


class ProfileConfig(Section):
    wait: int = Field(1, ge=0, description="Steps skipped before the profiler starts.")
    warmup: int = Field(2, ge=0, description="Steps traced but discarded (profiler warm-up).")
    active: int = Field(3, gt=0, description="Steps recorded into the trace.")


class SpikeGuardConfig(Section):
    window: int = Field(
        50, ge=5, description="Steps before a step whose loss mean and deviation it is judged by."
    )
    z: float = Field(6.0, gt=0, description="Standard deviations above the mean that make a spike.")
    action: Literal["log", "rollback"] = Field(
        "log",
        description="log: one line per spike; rollback: also go back to the last checkpoint and "
        "train on with the spiking step's batch skipped (counts against "
        "train.max_skipped_steps).",
    )
