"""`kubetune plan`: predicted peak GPU memory per GPU for a recipe, and whether it fits.

The model is built on the meta device from its real config (shipped below for the recipes'
hub models, read from config.json for local and tiny:// models), so parameter counts and LoRA
shapes are exact. Memory per GPU is the sum of:

- weights: bf16/fp16 2 bytes (fp32 4); qlora: linear layers 4-bit NF4 (0.5 byte + 0.0158 for
  double-quantized constants, 0.0625 without) or 8-bit (1 byte); the rest (embeddings, norms,
  the head) in quant.compute_dtype, as the worker keeps them;
- trainable state: LoRA weights fp32 + gradient fp32 + AdamW moments fp32 = 16 bytes/param;
  full fine-tuning: gradient in the weights' dtype + AdamW moments in the weights' dtype
  (what the worker runs: no fp32 master copy);
- activations (Korthikanti et al. 2022, bf16): per layer and token (11 + 4 + MLP) * hidden;
  with LoRA on a bf16 MoE model's experts, each kept layer's experts once more (peft makes
  W + B A at each forward and keeps it for the backward)
  bytes, MLP = 2 + 8*i/h for gated MLPs or 2 + 4*i/h; a checkpointed layer keeps only its
  input (2*hidden bytes per token); with every layer checkpointed, one layer being recomputed
  adds its activations (with some, the bottom ones, the layers above have freed theirs); eager
  attention adds 5*heads*seq bytes per token and layer (SDPA/flash do not materialise scores);
- logits: with train.kernels=none, seq * batch * vocab * 10 bytes (bf16 logits, fp32 upcast
  and its gradient); otherwise the loss runs chunk by chunk over the output head (kubetune's
  chunked loss or Liger's): one chunk's logits in fp32 plus their bf16 copy, and the saved
  gradient of the hidden states;
- sharding: fsdp and ZeRO-3 divide weights and trainable state by the GPU count (plus two
  gathered layers); ZeRO-2 divides trainable state; optimizer offload moves the AdamW moments
  (and fp32 master) to the CPU, parameter offload the weights;
- 1 GB of CUDA context and allocator slack.

`train.gradient_checkpointing: auto` and `train.micro_batch_size: auto` are chosen from this
plan (`fit.py`): the plan is evaluated for each candidate and the choice is part of it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from ..config import RunConfig
from ..errors import UserError
from ..methods import method_of, named
from ..objectives import row_tokens
from ..objectives.preference import reference_mode
from .architecture import Architecture, architecture
from .fit import Fit, choose
from .gpus import GPU_TYPES

GB = 1e9
GPU_MEMORY_GB = {name: g.memory_gb for name, g in GPU_TYPES.items()}
CUDA_OVERHEAD = 1.0 * GB


@dataclass
class Plan:
    arch: Architecture
    gpus: int
    seq_len: int
    micro_batch: int
    parts: dict[str, float] = field(default_factory=dict)  # bytes per GPU
    gpu: str = "none"
    gpu_memory: float | None = None
    method: str = "lora"
    fit: Fit | None = None  # the micro batch and checkpointed layers this plan is for

    @property
    def trainable_params(self) -> int:
        """Every parameter for full fine-tuning; the adapter's (LoRA, LLaMA-Adapter) otherwise."""
        return named(self.method).trained_params(self.arch)

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    @property
    def fits(self) -> bool | None:
        return None if self.gpu_memory is None else self.total <= self.gpu_memory

    def as_dict(self) -> dict:
        return {
            "gpu": self.gpu,
            "gpu_memory_gb": self.gpu_memory / GB if self.gpu_memory else None,
            "gpus": self.gpus,
            "seq_len": self.seq_len,
            "micro_batch": self.micro_batch,
            "total_params": self.arch.total_params,
            "params": self.arch.params_record(),
            "trainable_params": self.trainable_params,
            "parts_gb": {k: round(v / GB, 2) for k, v in self.parts.items()},
            "total_gb": round(self.total / GB, 2),
            "fits": self.fits,
            "gradient_checkpointing": self.fit.checkpointing_record() if self.fit else None,
            "micro_batch_choice": self.fit.micro_record(self.gpus) if self.fit else None,
        }


def weight_bytes(cfg: RunConfig, arch: Architecture, dtype_bytes: int) -> float:
    return method_of(cfg).weight_bytes(cfg, arch, dtype_bytes)


def trainable_bytes(cfg: RunConfig, arch: Architecture, dtype_bytes: int) -> tuple[float, float]:
    """(bytes that live with the weights: gradients, LoRA fp32 weights; AdamW moments)."""
    return method_of(cfg).trainable_bytes(cfg, arch, dtype_bytes)


def saved_bytes_per_token_layer(arch: Architecture) -> float:
    """A decoder layer's saved activations per token in bf16 (Korthikanti et al. 2022)."""
    mlp = 2 + (8 if arch.gated_mlp else 4) * arch.intermediate / arch.hidden
    return (11 + 4 + mlp) * arch.hidden


def activation_bytes(arch: Architecture, tokens: int, seq: int, eager: bool, checkpointed: int):
    """Saved activations with `checkpointed` of the decoder layers recomputed in backward."""
    per_layer_token = saved_bytes_per_token_layer(arch)
    if eager:
        per_layer_token += 5 * arch.heads * seq
    kept = (arch.layers - checkpointed) * per_layer_token + checkpointed * 2 * arch.hidden
    # The bottom layers are the checkpointed ones: backward reaches them after the layers above
    # have freed their activations, so rebuilding one adds to the peak only when every layer
    # is checkpointed.
    recomputing = per_layer_token if checkpointed == arch.layers else 0
    saved = tokens * (kept + recomputing)
    if arch.materialized_experts:  # each kept layer's W + B A (bf16), saved for its backward
        per_layer = arch.expert_params / max(arch.moe_layers, 1) * 2
        saved += per_layer * max(arch.layers - checkpointed, 1)
    return saved


def logits_bytes(cfg: RunConfig, arch: Architecture, tokens: int) -> float:
    if cfg.train.kernels == "none" or method_of(cfg).head_forward:  # the head's own forward
        return float(tokens * arch.vocab * 10)
    from .kernel_choice import chunk_rows

    chunk = min(tokens, chunk_rows(tokens, arch.hidden, arch.vocab))
    return float(chunk * arch.vocab * 6 + tokens * arch.hidden * 2)


def gpu_memory_bytes(cfg: RunConfig) -> float | None:
    """The memory of hardware.gpu (or hardware.gpu_memory_gb) in bytes; None for `none`."""
    memory_gb = cfg.hardware.gpu_memory_gb or GPU_MEMORY_GB.get(cfg.hardware.gpu)
    if memory_gb is None and cfg.hardware.gpu != "none":
        raise UserError(
            f"hardware.gpu: unknown GPU {cfg.hardware.gpu!r}; known: "
            f"{', '.join(GPU_MEMORY_GB)} (or set hardware.gpu_memory_gb)"
        )
    return memory_gb * GB if memory_gb else None


def estimate(
    cfg,
    gpus: int | None = None,
    dtype_bytes: int | None = None,
    device_memory: float | None = None,
    rows_per_rank: int | None = None,
) -> Plan:
    """The plan on GPUs; dtype_bytes defaults to model.dtype's (auto: bf16 on a GPU).

    Memory is hardware.gpu's, else `device_memory` (the worker's own GPU); `auto` micro batch
    and checkpointing are chosen against it (fit.py), `rows_per_rank` bounding the micro
    batch when the data is known."""
    arch = architecture(cfg)
    dtype_bytes = dtype_bytes or (4 if cfg.model.dtype == "float32" else 2)
    gpus = gpus or cfg.distributed.world_size
    memory = gpu_memory_bytes(cfg) or device_memory

    def total(micro: int, checkpointed: int) -> float:
        return plan_for(cfg, arch, gpus, dtype_bytes, micro, checkpointed).total

    fit = choose(cfg, total, arch.layers, gpus, memory, rows_per_rank)
    plan = plan_for(cfg, arch, gpus, dtype_bytes, fit.micro_batch_size, fit.checkpointed_layers)
    plan.gpu_memory, plan.fit = memory, fit
    if cfg.hardware.gpu == "none" and device_memory is not None:
        plan.gpu = "this GPU"
    return plan


def plan_for(
    cfg, arch: Architecture, gpus: int, dtype_bytes: int, micro: int, checkpointed: int
) -> Plan:
    """The memory parts per GPU for one micro batch and number of checkpointed layers."""
    seq = row_tokens(cfg)  # a preference row: a pair, or packed pairs
    strategy, zero, offload = (
        cfg.distributed.strategy,
        cfg.distributed.zero_stage,
        cfg.distributed.offload,
    )
    weights = weight_bytes(cfg, arch, dtype_bytes)
    with_weights, moments = trainable_bytes(cfg, arch, dtype_bytes)
    shard_weights = strategy == "fsdp" or (strategy == "deepspeed" and zero == 3)
    shard_state = shard_weights or strategy == "deepspeed"
    group = gpus  # processes that share one copy
    fsdp = cfg.distributed.fsdp
    if strategy == "fsdp":
        group = {"no_shard": 1, "hybrid": min(gpus, cfg.distributed.procs_per_node)}.get(
            fsdp.sharding, gpus
        )
        # shard_grad_op holds every layer's gathered weights from its forward to its backward
        shard_weights = group > 1 and fsdp.sharding != "shard_grad_op"
        shard_state = group > 1
    gathered = 2 * arch.layer_params * dtype_bytes if shard_weights else 0
    if shard_weights:
        weights /= group
    if shard_state:
        with_weights /= group
        moments /= group
    if strategy == "fsdp" and fsdp.cpu_offload:  # at rest on the CPU; a layer gathered at a time
        weights, with_weights, moments = 0.0, 0.0, 0.0
        gathered = 2 * arch.layer_params * dtype_bytes
    if strategy == "deepspeed" and offload in ("optimizer", "optimizer+params"):
        moments = 0.0
        if not method_of(cfg).trains_base:
            with_weights /= 2  # fp32 master copy goes with the optimizer
    if strategy == "deepspeed" and offload == "optimizer+params":
        weights = 0.0
    tokens = seq * micro
    eager = cfg.model.attn_implementation == "eager"
    plan = Plan(
        arch,
        gpus,
        seq,
        micro,
        {
            "weights": weights,
            "trainable state": with_weights + moments,
            "gathered layers": float(gathered),
            "activations": activation_bytes(arch, tokens, seq, eager, checkpointed),
            "logits": logits_bytes(cfg, arch, tokens),
            "cuda overhead": CUDA_OVERHEAD,
        },
    )
    if reference_copy(cfg):  # dpo/ipo's frozen reference, sharded as the policy's weights
        plan.parts["reference copy"] = weights
    plan.gpu, plan.method = cfg.hardware.gpu, cfg.method
    return plan


def render(plan: Plan, cfg: RunConfig) -> str:
    a = plan.arch
    lines = [
        f"{cfg.model.name_or_path}: {a.total_params / 1e9:.2f}B params"
        + (f", {a.active / 1e9:.2f}B active" if a.active != a.total_params else "")
        + f" ({a.model_type}), "
        f"method {cfg.method}, strategy {cfg.distributed.strategy}, {plan.gpus} GPU(s), "
        f"seq {plan.seq_len} x micro batch {plan.micro_batch}, gradient checkpointing "
        f"{checkpointing_words(plan.fit)}",
        *objective_words(cfg),
        f"trainable: {plan.trainable_params / 1e6:,.1f}M params",
    ]
    fit = plan.fit
    if fit is not None and fit.micro_setting == "auto":
        lines.append(
            f"micro batch auto: {fit.micro_batch_size} x grad_accum {fit.grad_accum} "
            f"({fit.micro_reason})"
        )
    if fit is not None and fit.checkpointing_setting == "auto":
        lines.append(f"gradient checkpointing auto: {fit.checkpointing_reason}")
    lines += ["", "| per GPU | GB |", "| --- | ---: |"]
    lines += [f"| {name} | {value / GB:.2f} |" for name, value in plan.parts.items()]
    lines.append(f"| **total** | **{plan.total / GB:.2f}** |")
    if plan.gpu_memory:
        verdict = "fits" if plan.fits else "does NOT fit"
        lines += [
            "",
            f"{verdict} on {plan.gpu} ({plan.gpu_memory / GB:.0f} GB): "
            f"{(plan.gpu_memory - plan.total) / GB:+.1f} GB headroom",
        ]
    return "\n".join(lines) + "\n"


def reference_copy(cfg) -> bool:
    """dpo/ipo with a live reference for a method that cannot switch itself off: a frozen
    copy of the base (train/reference.py)."""
    return reference_mode(cfg) == "live" and not method_of(cfg).switches_off


def objective_words(cfg) -> list[str]:
    """The plan's line on a preference objective: what a row and a step hold for it."""
    if cfg.data.format != "preference":
        return []
    mode = reference_mode(cfg)
    reference = {
        None: "no reference model",
        "precomputed": "the reference's log-probabilities computed in one pass before training",
        "live": "a reference forward each micro batch ("
        + ("a frozen copy of the weights" if reference_copy(cfg) else "the adapters off")
        + ")",
    }[mode]
    return [
        f"objective {cfg.train.objective}: rows of pairs (each sequence up to "
        f"{cfg.data.max_seq_len} tokens, a row up to {row_tokens(cfg)}), {reference}"
    ]


def checkpointing_words(fit: Fit | None) -> str:
    if fit is None or fit.checkpointed_layers == 0:
        return "off"
    if fit.checkpointed_layers == fit.layers:
        return "on"
    return f"on {fit.checkpointed_layers} of {fit.layers} layers"


def dump(plan: Plan, path: Path) -> None:
    path.write_text(json.dumps(plan.as_dict(), indent=1))


@dataclass(frozen=True)
class Inference:
    """What serving the merged model in bf16 needs per replica."""

    gpus: int  # 0: no GPU (hardware.gpu none)
    gpu: str
    memory: str  # host memory, a Kubernetes quantity
    reason: str


MAX_SERVE_GPUS = 8  # one replica is one pod, on one node
KV_ROOM = 1.3  # weights + 30% for the KV cache and activations, as the evaluate step sizes it


def gpus_needed(params: int, gpu_gb: float) -> int:
    """GPUs of `gpu_gb` that hold `params` in bf16 with KV_ROOM."""
    return max(1, math.ceil(params * 2 * KV_ROOM / (gpu_gb * GB)))


def inference_plan(cfg: RunConfig, arch: Architecture | None = None) -> Inference:
    """GPUs and memory for one replica of the merged model (bf16): enough GPUs to hold the
    weights with 30% room, rounded up to a tensor-parallel size vLLM accepts (a power of two
    that divides the attention heads), at most a node's GPUs; host memory for loading the
    weights (their size, +10%, +8 GiB). Without a known GPU: 1 GPU; without GPUs: none. One
    replica is one pod: more than 8 GPUs is reported, and render-serve refuses it. `arch`: the
    model's, when the caller has it already."""
    arch = arch or architecture(cfg)
    weights = arch.total_params * 2
    memory = f"{max(16, math.ceil(weights * 1.1 / 2**30) + 8)}Gi"
    gpu_gb = cfg.hardware.gpu_memory_gb or GPU_MEMORY_GB.get(cfg.hardware.gpu)
    if not cfg.hardware.uses_gpu:
        return Inference(0, "none", memory, "no GPU in the recipe")
    if not gpu_gb:
        why = f"hardware.gpu {cfg.hardware.gpu} has no known memory: 1 GPU"
        return Inference(1, cfg.hardware.gpu, memory, why)
    need = gpus_needed(arch.total_params, gpu_gb)
    sizes = [n for n in (1, 2, 4, 8) if n >= need]
    fitting = [n for n in sizes if arch.heads % n == 0]
    gpus = (fitting or sizes or [need])[0]
    reason = (
        f"{weights / GB:.1f} GB of bf16 weights +30% over {gpu_gb:g} GB GPUs: {need} needed, "
        + (f"{gpus} for tensor parallelism" if gpus <= MAX_SERVE_GPUS else "more than a node has")
    )
    return Inference(gpus, cfg.hardware.gpu, memory, reason)
