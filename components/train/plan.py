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
- activations (Korthikanti et al. 2022, bf16): per layer and token (11 + 4 + MLP) * hidden
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
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..config import ADAPTER_METHODS, RunConfig
from ..errors import UserError
from .fit import Fit, choose

GB = 1e9
GPU_MEMORY_GB = {
    "A100-80GB": 80,
    "A100-40GB": 40,
    "H100-80GB": 80,
    "H200-141GB": 141,
    "A10G-24GB": 24,
    "L4-24GB": 24,
    "L40S-48GB": 48,
    "V100-32GB": 32,
    "V100-16GB": 16,
}
CUDA_OVERHEAD = 1.0 * GB

# Falcon-40B and -180B: the new decoder architecture with 8 grouped KV heads.
_FALCON_NEW_DECODER = {
    "model_type": "falcon",
    "num_kv_heads": 8,
    "new_decoder_architecture": True,
    "parallel_attn": True,
    "bias": False,
    "alibi": False,
    "vocab_size": 65024,
}
# Public configs of the recipes' hub models (so planning needs no download).
KNOWN_CONFIGS = {
    "tiiuae/falcon-7b": {
        "model_type": "falcon",
        "hidden_size": 4544,
        "num_hidden_layers": 32,
        "num_attention_heads": 71,
        "multi_query": True,
        "parallel_attn": True,
        "new_decoder_architecture": False,
        "bias": False,
        "alibi": False,
        "vocab_size": 65024,
    },
    "tiiuae/falcon-40b": {
        **_FALCON_NEW_DECODER,
        "hidden_size": 8192,
        "num_hidden_layers": 60,
        "num_attention_heads": 128,
    },
    "tiiuae/falcon-180B": {
        **_FALCON_NEW_DECODER,
        "hidden_size": 14848,
        "num_hidden_layers": 80,
        "num_attention_heads": 232,
    },
    "meta-llama/Meta-Llama-3-8B": {
        "model_type": "llama",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "tie_word_embeddings": False,
    },
    "meta-llama/Meta-Llama-3-70B": {
        "model_type": "llama",
        "hidden_size": 8192,
        "intermediate_size": 28672,
        "num_hidden_layers": 80,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "tie_word_embeddings": False,
    },
    "mistralai/Mistral-7B-v0.1": {
        "model_type": "mistral",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 32000,
        "tie_word_embeddings": False,
    },
    "Qwen/Qwen2-7B": {
        "model_type": "qwen2",
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "vocab_size": 152064,
        "tie_word_embeddings": False,
    },
}


@dataclass
class Architecture:
    model_type: str
    total_params: int
    linear_params: int  # in quantizable linear layers (not the output head)
    adapter_params: int  # trainable parameters of LoRA (targets, rank) or LLaMA-Adapter (v2)
    layers: int
    hidden: int
    heads: int
    intermediate: int
    vocab: int
    gated_mlp: bool
    layer_params: int
    frozen_params: int = 0  # method=full with train.freeze_layers: embeddings + bottom layers


def model_config(name_or_path: str):
    from transformers import CONFIG_MAPPING, AutoConfig

    if name_or_path in KNOWN_CONFIGS:
        values = dict(KNOWN_CONFIGS[name_or_path])
        return CONFIG_MAPPING[values.pop("model_type")](**values)
    from ..models import resolve_model

    source = resolve_model(name_or_path)
    try:
        return AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise UserError(
            f"model.name_or_path: no config for {name_or_path!r} ({exc}); kubetune "
            f"plan knows {', '.join(KNOWN_CONFIGS)} without a download"
        ) from None


# The files whose code decides the counts: a cached count is keyed by their bytes too.
COUNTING_CODE = ("train/plan.py", "train/modeling.py", "llama_adapter.py")  # under components/


def _raw_config(cfg: RunConfig) -> dict | None:
    """The model's config as plain JSON without importing transformers (which imports torch):
    a fetched copy's or a local folder's config.json, or kubetune's table of known configs.
    None for a hub id it would have to download."""
    from ..models import model_source

    if cfg.model.name_or_path in KNOWN_CONFIGS and not cfg.model.local_dir:
        return dict(KNOWN_CONFIGS[cfg.model.name_or_path])
    try:
        folder = Path(model_source(cfg.model))
    except UserError:
        return None
    try:
        return json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None


def _architecture_cache(config: dict, cfg: RunConfig) -> Path:
    """Where the counts of this architecture and these adapter settings are kept: instantiating
    the model, even on the meta device, costs seconds (transformers' modeling and torch), and
    plan, compile and render-serve ask for the same counts again and again."""
    import hashlib
    import importlib.metadata

    from ..tiny_models import cache_root

    here = Path(__file__).parent.parent
    key = hashlib.sha256()
    for name in COUNTING_CODE:
        key.update((here / name).read_bytes())
    settings = [
        config,
        cfg.method,
        cfg.lora.model_dump(mode="json"),
        cfg.adapter.model_dump(mode="json"),
        cfg.train.freeze_layers,
        importlib.metadata.version("transformers"),
    ]
    key.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return cache_root() / "architectures" / f"{key.hexdigest()[:24]}.json"


def architecture(cfg: RunConfig) -> Architecture:
    """Count parameters exactly on a meta-device instance of the model (once per
    architecture and adapter settings: the counts are cached)."""
    from ..models import load_config

    raw = _raw_config(cfg)
    cached = _architecture_cache(raw, cfg) if raw is not None else None
    if cached is not None and cached.is_file():
        try:
            return Architecture(**json.loads(cached.read_text()))
        except (OSError, ValueError, TypeError):
            pass  # unreadable: count again and replace it
    config = load_config(cfg.model) if cfg.model.local_dir else model_config(cfg.model.name_or_path)
    arch = _count(config, cfg)
    if cached is not None:
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            partial = cached.with_suffix(f".{os.getpid()}.partial")
            partial.write_text(json.dumps(asdict(arch)))
            partial.replace(cached)
        except OSError:
            pass  # a read-only cache only costs the next call the same seconds
    return arch


def _count(config, cfg: RunConfig) -> Architecture:
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from .modeling import linear_layer_names, lora_targets

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.tie_weights()  # from_config on meta leaves tied heads as separate tensors
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    linears = linear_layer_names(model)
    linear_params = sum(model.get_submodule(n).weight.numel() for n in linears)
    targets = lora_targets(cfg, config.model_type) if cfg.method in ("lora", "qlora") else []
    lora = 0
    for name in linears:
        leaf = name.rsplit(".", 1)[-1]
        if targets == "all-linear" or leaf in targets:
            module = model.get_submodule(name)
            lora += cfg.lora.r * (module.in_features + module.out_features)
    layers = config.num_hidden_layers
    hidden = config.hidden_size
    intermediate = (
        getattr(config, "intermediate_size", None)
        or getattr(config, "ffn_hidden_size", None)
        or 4 * hidden
    )
    layer_params = (total - model.get_input_embeddings().weight.numel()) // max(layers, 1)
    if cfg.method in ADAPTER_METHODS:  # installed on the meta model, counted
        from ..llama_adapter import AdapterSpec, install, trainable_count

        install(model, AdapterSpec.from_recipe(cfg))
        lora = trainable_count(model)
    frozen = 0
    if cfg.method == "full" and cfg.train.freeze_layers:
        from .modeling import freeze_bottom

        freeze_bottom(model, cfg.train.freeze_layers)
        frozen = sum({id(p): p.numel() for p in model.parameters() if not p.requires_grad}.values())
    return Architecture(
        model_type=config.model_type,
        total_params=total,
        linear_params=linear_params,
        adapter_params=lora,
        layers=layers,
        hidden=hidden,
        heads=config.num_attention_heads,
        intermediate=intermediate,
        vocab=config.vocab_size,
        gated_mlp=config.model_type != "falcon",
        layer_params=layer_params,
        frozen_params=frozen,
    )


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
        return self.arch.total_params if self.method == "full" else self.arch.adapter_params

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
            "trainable_params": self.trainable_params,
            "parts_gb": {k: round(v / GB, 2) for k, v in self.parts.items()},
            "total_gb": round(self.total / GB, 2),
            "fits": self.fits,
            "gradient_checkpointing": self.fit.checkpointing_record() if self.fit else None,
            "micro_batch_choice": self.fit.micro_record(self.gpus) if self.fit else None,
        }


def weight_bytes(cfg: RunConfig, arch: Architecture, dtype_bytes: int) -> float:
    if cfg.method == "qlora":
        other = arch.total_params - arch.linear_params
        per = (
            1.0
            if cfg.quant.bits == 8
            else 0.5 + (1 / 64 + 4 / (64 * 256) if cfg.quant.double_quant else 4 / 64)
        )
        return arch.linear_params * per + other * (4 if cfg.quant.compute_dtype == "float32" else 2)
    return arch.total_params * dtype_bytes


def trainable_bytes(cfg: RunConfig, arch: Architecture, dtype_bytes: int) -> tuple[float, float]:
    """(bytes that live with the weights: gradients, LoRA fp32 weights; AdamW moments)."""
    if cfg.method == "full":
        trained = arch.total_params - arch.frozen_params
        return trained * dtype_bytes, trained * 2 * dtype_bytes
    return arch.adapter_params * 8, arch.adapter_params * 8


def activation_bytes(arch: Architecture, tokens: int, seq: int, eager: bool, checkpointed: int):
    """Saved activations with `checkpointed` of the decoder layers recomputed in backward."""
    mlp = 2 + (8 if arch.gated_mlp else 4) * arch.intermediate / arch.hidden
    per_layer_token = (11 + 4 + mlp) * arch.hidden
    if eager:
        per_layer_token += 5 * arch.heads * seq
    kept = (arch.layers - checkpointed) * per_layer_token + checkpointed * 2 * arch.hidden
    # The bottom layers are the checkpointed ones: backward reaches them after the layers above
    # have freed their activations, so rebuilding one adds to the peak only when every layer
    # is checkpointed.
    recomputing = per_layer_token if checkpointed == arch.layers else 0
    return tokens * (kept + recomputing)


def logits_bytes(cfg: RunConfig, arch: Architecture, tokens: int) -> float:
    if cfg.train.kernels == "none" or cfg.method == "adapter_v2":  # the head's own forward
        return float(tokens * arch.vocab * 10)
    from .kernels import chunk_rows

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
    gpus = gpus or cfg.distributed.nodes * cfg.distributed.procs_per_node
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
    seq = cfg.data.max_seq_len
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
        if cfg.method != "full":
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
    plan.gpu, plan.method = cfg.hardware.gpu, cfg.method
    return plan


def render(plan: Plan, cfg: RunConfig) -> str:
    a = plan.arch
    lines = [
        f"{cfg.model.name_or_path}: {a.total_params / 1e9:.2f}B params ({a.model_type}), "
        f"method {cfg.method}, strategy {cfg.distributed.strategy}, {plan.gpus} GPU(s), "
        f"seq {plan.seq_len} x micro batch {plan.micro_batch}, gradient checkpointing "
        f"{checkpointing_words(plan.fit)}",
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
    from ..backends.pytorchjob import uses_gpu

    arch = arch or architecture(cfg)
    weights = arch.total_params * 2
    memory = f"{max(16, math.ceil(weights * 1.1 / 2**30) + 8)}Gi"
    gpu_gb = cfg.hardware.gpu_memory_gb or GPU_MEMORY_GB.get(cfg.hardware.gpu)
    if not uses_gpu(cfg):
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
