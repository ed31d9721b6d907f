"""`kubetune plan`'s table of options: each GPU type's fit, step time, throughput, wall time,
GPU-hours and cost, each figure with its band, and the settings no calibration point had."""

from __future__ import annotations

from .data_figures import Data
from .forecast import Option
from .speed import Efficiency


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def ranged(value: float | None, low_high: tuple[float, float] | None, fmt) -> str:
    """`6.20 (4.80-7.60)`: a figure with its band."""
    if value is None or low_high is None:
        return "-"
    return f"{fmt(value)} ({fmt(low_high[0])}-{fmt(low_high[1])})"


def render_options(chosen: list[Option], data: Data, eff: Efficiency) -> str:
    lines = [
        "",
        "| GPUs | fits (GB/GPU) | micro x accum, checkpointed | step s | tokens/s per GPU | "
        "tokens/s | samples/s (band) | bound | steps | wall (band) | GPU-hours (band) | "
        "cost (band) | |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for o in chosen:
        fit = o.plan.fit
        assert fit is not None, "estimate() always fits"
        memory = f"{'yes' if o.fits else 'NO'} ({o.plan.total / 1e9:.1f}/{o.gpu.memory_gb:g})"
        bands = o.bands()
        samples = ranged(o.step.samples_per_second, bands["samples_per_second"], "{:,.2f}".format)
        wall = ranged(o.wall_seconds, bands["wall_seconds"], duration)
        hours = ranged(o.gpu_hours, bands["gpu_hours"], "{:,.1f}".format)
        cost = ranged(o.cost, bands["cost"], "{:,.2f}".format)
        lines.append(
            f"| {o.gpus} x {o.gpu.name} | {memory} | {fit.micro_batch_size} x {fit.grad_accum}, "
            f"{fit.checkpointed_layers}/{fit.layers} | {o.step.step_seconds:.3f} | "
            f"{o.step.tokens_per_second / o.gpus:,.0f} | {o.step.tokens_per_second:,.0f} | "
            f"{samples} | {o.step.bound} | {'-' if o.steps is None else o.steps} | {wall} | "
            f"{hours} | {cost} | {' '.join(o.marks)} |"
        )
    band = chosen[0].band  # one calibration for every option (parse_gpus names one at least)
    lines += [
        "",
        f"rows: {data.source}",
        f"speed model: {eff.describe()} (fitted on {eff.points} measured points; "
        "docs/planning.md says how near it lands)",
        f"band: where measured runs fell when each publication's points were left out of the "
        f"fit, measured / predicted {band.low:.2f}-{band.high:.2f} (quantiles "
        f"{band.quantiles[0]:g}-{band.quantiles[1]:g} of {band.points} points; "
        f"{band.within_30_percent:.0%} of them within +-30%)",
    ]
    for o in chosen:
        if o.outside:
            settings = ", ".join(f"{k} {v}" for k, v in o.outside.items())
            lines.append(
                f"outside the calibration: {o.gpus} x {o.gpu.name}: no measured point ran "
                f"{settings}; the band does not cover it"
            )
    if all(o.price is None for o in chosen):
        lines.append("cost: set hardware.price_per_gpu_hour (one price, or one per GPU type)")
    if not any(o.fits for o in chosen):
        lines.append("no option fits: see the memory plan above")
    return "\n".join(lines) + "\n"
