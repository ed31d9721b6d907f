"""`kubetune plan`'s time and cost: for each GPU type asked for, the memory plan (does it fit,
with which micro batch and checkpointing) and the speed model (`speed.py`) give the step time;
the dataset gives the steps; the recipe's prices give the bill.

Rows and tokens: a prepared dataset's stats.json (`--dataset DIR`) gives the train and eval
rows, the mean example (the attention span of packed rows) and the longest (the padded row of
unpacked ones). Without it, the data source's records are counted (a local file; a known hub
dataset's published size) and each is taken as one full row (an upper bound with packing).

Wall time = startup (reading the base weights at LOAD_BYTES_S, compiling the layers) + steps x
step time + checkpoint saves (written, then read back for their checksums) + the eval passes
(forward only: a third of a training step per row). GPU-hours = wall time x GPUs; cost =
GPU-hours x price (hardware.price_per_gpu_hour: one price, or one per GPU type).

Each figure comes with the band the calibration's out-of-sample errors imply (`calibration.Band`:
measured / predicted between two quantiles when each publication's points were left out of the
fit), and with the settings no measured point had (a GPU, a method, a stack)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..architectures import auto_attention
from ..config import RunConfig
from ..errors import UserError
from ..methods import method_of
from ..objectives import row_tokens
from ..objectives.preference import reference_mode
from .architecture import Architecture, architecture
from .calibration import Band, features
from .data_figures import Data, data_figures, row_shape
from .gpus import COMMON, GPU_TYPES, GpuType, named
from .speed import (
    COMPILE_SECONDS,
    LOAD_BYTES_S,
    SAVE_BYTES_S,
    Efficiency,
    Setup,
    StepTime,
    as_dict,
    step_time,
)

if TYPE_CHECKING:
    from .fit import Fit
    from .plan import Plan

EVAL_FORWARD_SHARE = 1 / 3  # a forward-only row costs a third of a training row


def planned_setup(cfg: RunConfig, arch: Architecture, fit: Fit, data: Data, gpus: int) -> Setup:
    """The step the worker will run on a GPU for this recipe: its kernels as the trainer image
    (with liger-kernel) chooses them on CUDA (`kernels.select_kernels`)."""
    import torch

    from .kernel_choice import select_kernels

    dist = cfg.distributed
    kernels = select_kernels(
        cfg, torch.device("cuda"), arch.model_type, cfg.data.packing, liger_available=True
    )
    offload: str = dist.offload if dist.strategy == "deepspeed" else "none"
    if dist.strategy == "fsdp" and dist.fsdp.cpu_offload:
        offload = "cpu"
    dense = dense_attention(cfg, arch)
    return Setup(
        micro_batch=fit.micro_batch_size,
        row_len=data.row_len,
        span=data.row_len if dense else data.span,
        grad_accum=fit.grad_accum,
        gpus=gpus,
        procs_per_node=dist.procs_per_node,
        method=cfg.method,
        quant_bits=cfg.quant.bits if method_of(cfg).quantized_base else 0,
        checkpointed=fit.checkpointed_layers,
        strategy=dist.strategy,
        zero_stage=dist.zero_stage,
        sharding=dist.fsdp.sharding,
        offload=offload,
        dense_attention=dense,
        lora_dropout=cfg.lora.dropout > 0,
        reference_forward=reference_mode(cfg) == "live",
        weight_bytes=4 if cfg.model.dtype == "float32" else 2,
        **kernel_fields(kernels),
    )


def dense_attention(cfg: RunConfig, arch: Architecture) -> bool:
    """Whether the worker's attention on a GPU computes every score of a row: eager attention,
    or SDPA with the dense block-diagonal mask of packed rows (`model.attn_implementation:
    sdpa`, or `auto` for a family without a flex_attention path: train/attention.py), rather
    than a causal or block-sparse kernel (flash, flex). Where flash-attention is installed,
    `auto` takes it instead: the plan assumes the image without it (its default build)."""
    attn: str = cfg.model.attn_implementation
    packed = cfg.data.packing
    if attn == "auto":
        attn = auto_attention(packed, arch.flex_attention, arch.attention_fallback)
    return attn == "eager" or (attn == "sdpa" and packed)


def kernel_fields(kernels) -> dict:
    """The Setup fields of the kernels a run takes (`kernels.Kernels`)."""
    return {
        "fused_norms": kernels.rms_norm == "liger",
        "loss": "transformers" if kernels.loss == "transformers" else "chunked",
        "compiled": kernels.compile,
        "lora": "peft" if kernels.lora == "peft" else "fused",
    }


@dataclass
class Option:
    """One GPU type's prediction for the recipe."""

    gpu: GpuType
    gpus: int
    plan: Plan  # the memory plan
    setup: Setup
    step: StepTime
    steps: int | None
    seconds: dict[str, float] | None  # wall time's parts
    price: float | None
    data: Data
    band: Band
    outside: dict[str, str]  # the settings no calibration point had
    marks: list[str] = dataclasses.field(default_factory=list)

    @property
    def real_tokens_per_second(self) -> float | None:
        """Tokens of the examples (no padding) per second, when the prepared dataset says how
        many a row holds."""
        if not self.data.train_tokens or not self.data.train_rows:
            return None
        return self.data.train_tokens / self.data.train_rows * self.step.samples_per_second

    @property
    def fits(self) -> bool:
        return bool(self.plan.fits)

    @property
    def wall_seconds(self) -> float | None:
        return sum(self.seconds.values()) if self.seconds else None

    @property
    def gpu_hours(self) -> float | None:
        wall = self.wall_seconds
        return None if wall is None else wall / 3600 * self.gpus

    @property
    def cost(self) -> float | None:
        hours = self.gpu_hours
        return None if hours is None or self.price is None else hours * self.price

    def as_dict(self) -> dict:
        step = as_dict(self.step)
        return {
            "gpu": self.gpu.name,
            "gpus": self.gpus,
            "fits": self.fits,
            "memory": self.plan.as_dict(),
            "setup": dataclasses.asdict(self.setup),
            "step": step,
            "tokens_per_second_per_gpu": self.step.tokens_per_second / self.gpus,
            "samples_per_second_per_gpu": self.step.samples_per_second / self.gpus,
            "tokens_per_second": self.step.tokens_per_second,
            "samples_per_second": self.step.samples_per_second,
            "real_tokens_per_second": self.real_tokens_per_second,
            "steps": self.steps,
            "wall_seconds": self.wall_seconds,
            "wall_parts_seconds": self.seconds,
            "gpu_hours": self.gpu_hours,
            "price_per_gpu_hour": self.price,
            "cost": self.cost,
            "band": self.bands(),
            "outside_calibration": self.outside,
            "marks": self.marks,
        }

    def bands(self) -> dict:
        """Each figure's band (low, high) from the calibration's out-of-sample errors."""
        b = self.band
        step = self.step
        figures: dict = {
            "quantiles": list(b.quantiles),
            "samples_per_second": b.throughput(step.samples_per_second),
            "tokens_per_second": b.throughput(step.tokens_per_second),
        }
        for key, value in (
            ("wall_seconds", self.wall_seconds),
            ("gpu_hours", self.gpu_hours),
            ("cost", self.cost),
        ):
            figures[key] = None if value is None else b.duration(value)
        return figures


def parse_gpus(text: str | None, cfg: RunConfig) -> list[tuple[str, int]]:
    """`--gpus A100-80GB,2xH100-80GB`: GPU types, each optionally with a count (else the
    recipe's nodes x procs_per_node). Default: the recipe's hardware.gpu, else COMMON."""
    count = cfg.distributed.world_size
    if text is None:
        if cfg.hardware.gpu in GPU_TYPES:
            return [(cfg.hardware.gpu, count)]
        return [(name, count) for name in COMMON]
    if not text.strip():
        raise UserError("--gpus: name at least one GPU type, e.g. A100-80GB,2xH100-80GB")
    chosen = []
    for item in (part.strip() for part in text.split(",")):
        n, name = count, item
        head, sep, rest = item.partition("x")
        if sep and head.isdigit():
            n, name = int(head), rest
            if n < 1:
                raise UserError(f"--gpus {item}: a count of GPUs is at least 1")
        types = named(name)
        if len(types) != 1:
            which = " or ".join(g.name for g in types) if types else ", ".join(GPU_TYPES)
            raise UserError(
                f"--gpus: {'which' if len(types) > 1 else 'unknown'} GPU type {item!r}? "
                f"{'it may be' if len(types) > 1 else 'known:'} {which} "
                "(optionally with a count: 8xA100-80GB)"
            )
        if (types[0].name, n) in chosen:
            raise UserError(f"--gpus {item}: {n} x {types[0].name} is listed twice")
        chosen.append((types[0].name, n))
    return chosen


def price_of(cfg: RunConfig, gpu: str) -> float | None:
    price = cfg.hardware.price_per_gpu_hour
    if isinstance(price, dict):  # keyed by full names or short ones (L40S)
        return next((p for key, p in price.items() if named(key)[0].name == gpu), None)
    return price


def on_gpus(cfg: RunConfig, gpu: str, count: int) -> RunConfig:
    """The recipe on `count` GPUs of type `gpu` (whole nodes of procs_per_node; fewer on one)."""
    dist = cfg.distributed
    per_node = min(count, dist.procs_per_node)
    if count % per_node:
        raise UserError(
            f"--gpus {count}x{gpu}: not whole nodes of distributed.procs_per_node {per_node}"
        )
    return cfg.model_copy(
        update={
            "hardware": cfg.hardware.model_copy(update={"gpu": gpu, "gpu_memory_gb": None}),
            "distributed": dist.model_copy(
                update={"nodes": count // per_node, "procs_per_node": per_node}
            ),
        }
    )


def options(
    cfg: RunConfig, gpus: str | None = None, dataset: str | Path | None = None, eff=None
) -> tuple[list[Option], Data]:
    from .fit import total_steps
    from .plan import estimate

    eff = eff or Efficiency.load()
    band = Band.load()
    data = data_figures(cfg, dataset)
    arch = architecture(cfg)
    chosen = []
    for name, count in parse_gpus(gpus, cfg):
        run = on_gpus(cfg, name, count)
        rows_per_rank = data.train_rows // count if data.train_rows else None
        plan = estimate(run, count, rows_per_rank=rows_per_rank)
        fit = plan.fit
        assert fit is not None, "estimate() always fits"
        gpu = GPU_TYPES[name]
        setup = planned_setup(run, arch, fit, data, count)
        step = step_time(arch, setup, gpu, eff)
        steps, seconds = None, None
        if run.train.max_steps or data.train_rows:
            per_epoch = ((data.train_rows or 0) // count) // fit.micro_batch_size
            resolved = run.train.model_copy(update={"grad_accum": fit.grad_accum})
            steps = total_steps(run.model_copy(update={"train": resolved}), per_epoch)
            seconds = wall_parts(run, arch, setup, step, steps, data)
        outside = band.outside(features(arch, setup, name))
        price = price_of(cfg, name)
        chosen.append(
            Option(gpu, count, plan, setup, step, steps, seconds, price, data, band, outside)
        )
    mark(chosen)
    return chosen, data


def checkpoint_seconds(cfg: RunConfig, arch: Architecture) -> float:
    """Saving one checkpoint: the trained weights and their AdamW moments written, then read
    back for their SHA256SUMS (twice the bytes through the volume)."""
    return 2 * method_of(cfg).checkpoint_bytes(arch) / SAVE_BYTES_S


def wall_parts(cfg, arch, setup: Setup, step: StepTime, steps: int, data: Data) -> dict:
    from .plan import reference_copy

    saves = steps // cfg.train.save_steps
    evals = (steps // cfg.train.eval_steps if cfg.train.eval_steps else 0) + 1
    eval_rows = data.eval_rows / setup.gpus
    row_seconds = step.step_seconds / (step.rows_per_step / setup.gpus)
    parts = {
        "load weights": arch.total_params * 2 / LOAD_BYTES_S,
        "compile": COMPILE_SECONDS if setup.compiled else 0.0,
        "train steps": steps * step.step_seconds,
        "checkpoints": saves * checkpoint_seconds(cfg, arch),
        "eval": evals * eval_rows * row_seconds * EVAL_FORWARD_SHARE,
    }
    if reference_mode(cfg) == "precomputed":  # one forward over both splits before training
        rows = ((data.train_rows or 0) + data.eval_rows) / setup.gpus
        parts["reference pass"] = rows * row_seconds * EVAL_FORWARD_SHARE
    if reference_copy(cfg):
        parts["load weights"] *= 2  # the frozen reference copy too
    return parts


def mark(chosen: list[Option]) -> None:
    """The fastest and, where prices are set, the cheapest option among those that fit."""
    fitting = [o for o in chosen if o.fits]
    if not fitting:
        return
    timed = [o for o in fitting if o.wall_seconds is not None]
    if timed:
        min(timed, key=lambda o: o.wall_seconds or 0.0).marks.append("fastest")
    else:
        max(fitting, key=lambda o: o.step.samples_per_second).marks.append("fastest")
    priced = [o for o in timed if o.cost is not None]
    if priced:
        min(priced, key=lambda o: o.cost or 0.0).marks.append("cheapest")


def run_prediction(
    cfg: RunConfig, fit, world_size: int, device_name: str | None, stats: dict, steps: int, kernels
) -> dict | None:
    """What metrics.json records as `prediction`: the speed model's step time for this run as
    it is set up (its kernels, micro batch, checkpointing, GPUs), on this GPU's type (on a CPU:
    hardware.gpu's, when the recipe names one; None otherwise). The worker adds what it
    measured beside it (`compare`)."""
    from .gpus import gpu_type_of

    gpu = gpu_type_of(device_name) if device_name else GPU_TYPES.get(cfg.hardware.gpu)
    if gpu is None:
        return None
    eff = Efficiency.load()
    arch = architecture(cfg)
    seq = row_tokens(cfg)
    per_row = seq // cfg.data.max_seq_len
    packed = bool(stats.get("packing", {}).get("enabled", cfg.data.packing))
    lengths = stats.get("example_length") or {"max": cfg.data.max_seq_len, "mean": seq}
    row_len, span = row_shape(seq, packed, lengths, per_row)
    data = Data(None, 0, row_len, span, None, "dataset")
    setup = planned_setup(cfg, arch, fit, data, world_size)  # with the kernels this run took:
    setup = dataclasses.replace(setup, **kernel_fields(kernels))
    step = step_time(arch, setup, gpu, eff)
    warmup = COMPILE_SECONDS if setup.compiled else 0.0
    return {
        "gpu": gpu.name,
        "measured_on": device_name or "cpu",
        "step_seconds": step.step_seconds,
        "tokens_per_second": step.tokens_per_second,
        "samples_per_second": step.samples_per_second,
        "train_seconds": steps * step.step_seconds + warmup,
        "bound": step.bound,
        "efficiency": dataclasses.asdict(eff),
        "setup": dataclasses.asdict(setup),
        "architecture": dataclasses.asdict(arch),
    }


def compare(
    prediction: dict | None, padded_tokens_per_second: float | None, train_seconds: float
) -> dict | None:
    """The prediction with the run's measured figures and the errors (predicted / measured - 1)
    beside it."""
    if prediction is None:
        return None
    measured = {"tokens_per_second": padded_tokens_per_second, "train_seconds": train_seconds}
    errors = {
        key: prediction[key] / value - 1 if value else None for key, value in measured.items()
    }
    return {**prediction, "measured": measured, "error": errors}


def prediction_markdown(prediction: dict | None) -> str:
    """The KFP train task's Markdown: predicted against measured tokens/s and train time."""
    if not prediction:
        return "No speed prediction for this run: no known GPU type (hardware.gpu: none).\n"
    measured, error = prediction["measured"], prediction["error"]
    where = prediction["measured_on"]
    lines = [
        f"### Speed: predicted on {prediction['gpu']} against measured on {where}",
        "",
        "| | predicted | measured | error |",
        "| --- | ---: | ---: | ---: |",
    ]
    for key, label in (("tokens_per_second", "tokens/s (job)"), ("train_seconds", "train time s")):
        value, err = measured[key], error[key]
        lines.append(
            f"| {label} | {prediction[key]:,.1f} | "
            f"{'-' if value is None else f'{value:,.1f}'} | "
            f"{'-' if err is None else f'{err:+.1%}'} |"
        )
    if where == "cpu":
        lines += [
            "",
            "Measured on a CPU: the prediction is for the GPU, the figures do not compare.",
        ]
    return "\n".join(lines) + "\n"
