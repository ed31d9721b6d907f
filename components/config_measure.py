"""Every recipe section's base (`Section`: unknown keys refused, assignments validated), and the
measuring sections train.flop_counter and train.profile (config_sections.py's TrainConfig holds
them)."""

from __future__ import annotations

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
