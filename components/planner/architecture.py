"""A model's architecture as `kubetune plan` needs it: parameter counts (total, quantizable
linear layers, LoRA or LLaMA-Adapter trainables) and shapes, counted on the meta device from the
model's real config (shipped in KNOWN_CONFIGS for the recipes' hub models, read from config.json
for local and tiny:// models). Counting builds the model, so counts are cached in
KUBETUNE_CACHE/architectures, keyed by the config, the method's settings, transformers and the
counting code."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from ..architectures import KNOWN_CONFIGS, family
from ..config import RunConfig
from ..errors import UserError


@dataclass
class Architecture:
    model_type: str
    total_params: int
    linear_params: int  # in quantizable linear layers (not the output head) and experts
    adapter_params: int  # trainable parameters of LoRA (targets, rank) or LLaMA-Adapter (v2)
    layers: int
    hidden: int
    heads: int
    intermediate: int
    vocab: int
    gated_mlp: bool
    layer_params: int
    frozen_params: int = 0  # method=full with train.freeze_layers: embeddings + bottom layers
    linear_modules: int = 0  # the quantizable linear layers, counted
    adapted_modules: int = 0  # of them, the ones LoRA adapts
    adapted_features: int = 0  # their in + out features, summed
    # below the lowest trained layer (train.freeze_layers, LLaMA-Adapter's adapter.start_layer)
    frozen_layers: int = 0
    # mixture-of-experts: what one token passes through (every routed expert counted at
    # top-k / experts, the embedding table and the head included); total_params for dense models
    active_params: int | None = None
    embedding_params: int = 0  # the input embedding table (OpenAI counts active without it)
    # mixture-of-experts, for the speed model: routed experts per MoE layer, MoE layers, and
    # the matmul weights (base, and adapter) one token passes through, each routed expert's
    # counted at top-k / experts (None: a dense model, where linear_params and adapter_params
    # are those)
    experts: int = 0
    moe_layers: int = 0
    expert_params: int = 0  # every routed expert's weights (the fused 3-D tensors)
    # LoRA adapts the routed experts of a bf16 base through peft's parameter LoRA, which makes
    # each layer's W + B A anew at every forward and keeps it for the backward
    materialized_experts: bool = False
    matmul_params: int | None = None
    adapter_matmul_params: int | None = None
    # what the worker's `attn_implementation: auto` takes on a GPU (train/attention.py): a
    # document-masked flex_attention path for packed rows, else this fallback
    flex_attention: bool = False
    attention_fallback: str = "sdpa"

    @property
    def trained_share(self) -> float:
        """The share of the layers from the lowest trained one up: the only ones whose backward
        runs (input gradients stop there) and whose LLaMA-Adapter prompts exist."""
        return 1 - self.frozen_layers / self.layers

    @property
    def active(self) -> int:
        return self.total_params if self.active_params is None else self.active_params

    def params_record(self) -> dict:
        """`kubetune plan --json`'s parameter figures, each with the convention it uses."""
        return {
            "total": self.total_params,
            "active": self.active,
            "active_without_embeddings": self.active - self.embedding_params,
            "convention": "total: every parameter once (a tied head counted once); active: what "
            "one token passes through, each routed expert counted at top-k / experts, embeddings "
            "and head included; active_without_embeddings: the same less the input embedding "
            "table (OpenAI's gpt-oss figures)",
        }


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
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"model.name_or_path: no config for {name_or_path!r} ({first}); kubetune "
            f"plan knows {', '.join(KNOWN_CONFIGS)} without a download"
        ) from None


# The files whose code decides the counts: a cached count is keyed by their bytes too.
COUNTING_CODE = (  # components/
    "planner/architecture.py",
    "architectures/__init__.py",
    "architectures/base.py",
    "methods/lora.py",
    "methods/full.py",
    "methods/adapter.py",
    "methods/llama_adapter.py",
)


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


def active_params(config, total: int, experts: int) -> int | None:
    """What one token passes through of a mixture-of-experts model: the routed experts'
    parameters (`experts`) count at top-k / experts. None for a dense model."""
    routed = getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None)
    top_k = getattr(config, "num_experts_per_tok", None)
    if not experts or not routed or not top_k:
        return None
    return total - experts + round(experts * top_k / routed)


def _count(config, cfg: RunConfig) -> Architecture:
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from ..architectures import linear_layer_names, quantized_linear_names
    from ..methods import method_of

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.tie_weights()  # from_config on meta leaves tied heads as separate tensors
    # a tied head once: (name, elements, dimensions) by identity
    params = {id(p): (n, p.numel(), p.ndim) for n, p in model.named_parameters()}
    total = sum(size for _, size, _ in params.values())
    # the routed experts (under `.experts.`, fused 3-D or one module each)
    experts = sum(size for name, size, _ in params.values() if ".experts." in name)
    record = family(config.model_type)
    linears = linear_layer_names(model)
    quantized = quantized_linear_names(model)
    linear_params = sum(model.get_submodule(n).weight.numel() for n in quantized)
    if record.experts_4bit is not None:  # QLoRA quantizes them too
        linear_params += experts
    embeddings = model.get_input_embeddings().weight.numel()
    layers = config.num_hidden_layers
    hidden = config.hidden_size
    intermediate = (
        getattr(config, "intermediate_size", None)
        or getattr(config, "ffn_hidden_size", None)
        or 4 * hidden
    )
    layer_params = (total - embeddings) // max(layers, 1)
    counts = method_of(cfg).count(cfg, model, linears)
    routed = getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None)
    top_k = getattr(config, "num_experts_per_tok", None)
    moe = {}
    if experts and routed and top_k:
        share = top_k / routed
        dense = sum(model.get_submodule(n).weight.numel() for n in linears)
        moe = {
            "experts": routed,
            "moe_layers": sum(1 for n, _ in model.named_modules() if n.endswith(".experts")),
            "expert_params": sum(
                size for name, size, dims in params.values() if ".experts." in name and dims == 3
            ),
            "materialized_experts": counts.routed_trainable > 0
            and not method_of(cfg).quantized_base,
            "matmul_params": round(dense + experts * share),
            "adapter_matmul_params": round(
                counts.trainable - counts.routed_trainable * (1 - share)
            ),
        }
    return Architecture(
        model_type=config.model_type,
        total_params=total,
        linear_params=linear_params,
        adapter_params=counts.trainable,
        layers=layers,
        hidden=hidden,
        heads=config.num_attention_heads,
        intermediate=intermediate,
        vocab=config.vocab_size,
        gated_mlp=record.gated_mlp,
        layer_params=layer_params,
        frozen_params=counts.frozen,
        linear_modules=len(linears),
        adapted_modules=counts.adapted_modules,
        adapted_features=counts.adapted_features,
        frozen_layers=counts.frozen_layers,
        active_params=active_params(config, total, experts),
        embedding_params=embeddings,
        flex_attention=bool(record.flex_attention(config)),
        attention_fallback=record.attention_fallback,
        **moe,
    )
