"""Load the base model for a method, quantize it for real (qlora), wrap it with LoRA.

QLoRA does not go through transformers' bitsandbytes integration: it converts only modules
whose type is exactly `nn.Linear`, so Falcon's `FalconLinear` layers stay in bf16 without a
word. Instead the model is built on the meta device, every linear layer (subclasses included,
the output head excepted) is replaced by a bitsandbytes 4-bit or 8-bit layer, and the
safetensors tensors are streamed in one at a time, each quantized as it reaches its device —
so peak memory is the quantized model plus one tensor. The count of quantized layers is
checked against the count of linear layers before training starts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from ..architectures import family, quantized_linear_names
from ..architectures.base import ALWAYS_UNQUANTIZED
from ..errors import UserError
from ..methods import method_of
from ..models import load_config, model_revision, model_source, safetensors_files
from .attention import attention_implementation, transformers_attention
from .experts4bit import ExpertTensors, replace_fused_experts

if TYPE_CHECKING:
    from ..config import RunConfig

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def weights_dtype(cfg: RunConfig, device: torch.device) -> torch.dtype:
    """model.dtype, with auto = bf16 on a GPU that has it, else fp32 (CPU tests, old GPUs)."""
    if cfg.model.dtype != "auto":
        return DTYPES[cfg.model.dtype]
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def count_quantized(model: nn.Module) -> int:
    import bitsandbytes as bnb

    return sum(isinstance(m, bnb.nn.Linear4bit | bnb.nn.Linear8bitLt) for m in model.modules())


def _set_tensor(model: nn.Module, key: str, tensor: torch.Tensor, make) -> bool:
    module_name, _, attr = key.rpartition(".")
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        return False
    if attr in module._parameters:
        module._parameters[attr] = make(module, attr, tensor)
        return True
    if attr in module._buffers:
        module._buffers[attr] = tensor
        return True
    return False


def quant_storage(cfg: RunConfig, compute: torch.dtype) -> torch.dtype:
    """The dtype packed 4-bit weights are stored in: uint8, or the compute dtype under FSDP so
    a decoder layer's tensors share one dtype and shard together."""
    return compute if cfg.distributed.strategy == "fsdp" else torch.uint8


def replace_linear_layers(
    model: nn.Module, names: list[str], cfg: RunConfig, compute: torch.dtype
) -> None:
    """Swap the named (meta) linear layers for empty bitsandbytes 4-bit or 8-bit layers."""
    for name in names:
        old = model.get_submodule(name)
        parent_name, _, child = name.rpartition(".")
        new = quantized_linear(
            old.in_features, old.out_features, old.bias is not None, cfg, compute
        )
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def quantized_linear(
    fan_in: int, fan_out: int, bias: bool, cfg: RunConfig, compute: torch.dtype
) -> nn.Module:
    """An empty (meta) bitsandbytes 4-bit or 8-bit linear layer, as the recipe's quant says."""
    import bitsandbytes as bnb

    if cfg.quant.bits == 4:
        return bnb.nn.Linear4bit(
            fan_in,
            fan_out,
            bias=bias,
            compute_dtype=compute,
            compress_statistics=cfg.quant.double_quant,
            quant_type=cfg.quant.quant_type,
            quant_storage=quant_storage(cfg, compute),
            device="meta",
        )
    return bnb.nn.Linear8bitLt(
        fan_in, fan_out, bias=bias, has_fp16_weights=False, threshold=6.0, device="meta"
    )


def unquantized_weights(model: nn.Module) -> list[tuple[str, int]]:
    """(name, elements) of every weight outside the linear layers that a 4-bit base would keep in
    full precision though nothing allows it: not the output head or an embedding table, not 1-D
    (norms, biases), not named by the family record's `unquantized` (a router)."""
    kept = tuple(family(model.config.model_type).unquantized)
    head = model.get_output_embeddings()
    allowed = {id(p) for p in head.parameters()} if head is not None else set()
    left, seen = [], set()
    for module_name, module in model.named_modules():
        # linear layers (bitsandbytes' subclass nn.Linear) are counted by load_quantized's check
        linear = isinstance(module, nn.Linear)
        for name, param in module.named_parameters(recurse=False):
            full = f"{module_name}.{name}" if module_name else name
            if id(param) in seen or linear or param.ndim < 2 or id(param) in allowed:
                continue
            seen.add(id(param))
            if isinstance(module, nn.Embedding) or full.endswith(kept):
                continue
            left.append((full, param.numel()))
    return left


def check_all_quantized(model: nn.Module, bits: int) -> None:
    """Refuse a 4-bit (8-bit) base that would keep a large weight in full precision: what
    bitsandbytes' layer swap does, without a word, to weights that are not nn.Linear modules
    (the fused 3-D experts of transformers v5's MoE models)."""
    left = unquantized_weights(model)
    if not left:
        return
    total = sum({id(p): p.numel() for p in model.parameters()}.values())
    share = sum(n for _, n in left) / total
    names = ", ".join(name for name, _ in left[:3]) + (" ..." if len(left) > 3 else "")
    raise UserError(
        f"method=qlora: {len(left)} weights of model type {model.config.model_type!r} "
        f"({names}: {share:.0%} of its parameters) are not linear layers kubetune can quantize "
        f"to {bits}-bit, and would train in full precision; only {ALWAYS_UNQUANTIZED} and what "
        "the family record names may stay so. Train this model with method=lora"
    )


def build_on_meta(cfg: RunConfig, dtype: torch.dtype, attn: str) -> nn.Module:
    """The architecture with its parameters on the meta device (buffers real, on the CPU)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    config = load_config(cfg.model)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(
            config,
            dtype=dtype,
            attn_implementation=transformers_attention(attn, config.model_type),
            trust_remote_code=cfg.model.trust_remote_code,
        )
    model.tie_weights()
    return model


def load_quantized(
    cfg: RunConfig, source: str, device: torch.device, attn: str
) -> tuple[nn.Module, int]:
    """Build on meta, swap linear layers for bitsandbytes layers, stream weights in."""
    import bitsandbytes as bnb
    from safetensors import safe_open

    compute = DTYPES[cfg.quant.compute_dtype]
    model = build_on_meta(cfg, compute, attn)
    targets = quantized_linear_names(model)
    replace_linear_layers(model, targets, cfg, compute)
    record = family(model.config.model_type)
    if record.experts_4bit is not None:  # its fused experts: one quantized layer each
        replace_fused_experts(model, lambda i, o: quantized_linear(i, o, False, cfg, compute))
    check_all_quantized(model, cfg.quant.bits)

    def make(module, attr, tensor):
        if attr == "weight" and isinstance(module, bnb.nn.Linear4bit):
            return bnb.nn.Params4bit(
                tensor.to(compute),
                requires_grad=False,
                quant_type=cfg.quant.quant_type,
                compress_statistics=cfg.quant.double_quant,
                quant_storage=quant_storage(cfg, compute),
                module=module,
            ).to(device)
        if attr == "weight" and isinstance(module, bnb.nn.Linear8bitLt):
            return bnb.nn.Int8Params(
                tensor.to(torch.float16), requires_grad=False, has_fp16_weights=False
            ).to(device)
        return nn.Parameter(tensor.to(device=device, dtype=compute), requires_grad=False)

    def quantize(layer: nn.Module, weight: torch.Tensor) -> None:
        layer._parameters["weight"] = make(layer, "weight", weight)

    experts = ExpertTensors(model, record.experts_4bit, record.checkpoint_renames, quantize)
    for file in safetensors_files(source, model_revision(cfg.model)):
        with safe_open(str(file), framework="pt") as shard:
            for key in shard.keys():  # noqa: SIM118 (safe_open is not a dict)
                name, tensor = experts.rename(key), shard.get_tensor(key)
                if not experts.take(name, tensor):
                    _set_tensor(model, name, tensor, make)
    model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise UserError(
            f"model.name_or_path: the checkpoint has no tensor for {', '.join(missing[:5])}"
        )
    for name, buf in model.named_buffers():
        if buf.device != device:
            module_name, _, attr = name.rpartition(".")
            model.get_submodule(module_name)._buffers[attr] = buf.to(device)
    quantized = count_quantized(model)
    if quantized == 0 or quantized < len(targets):
        raise UserError(
            f"method=qlora: only {quantized} of {len(targets)} linear layers were "
            f"quantized to {cfg.quant.bits}-bit; refusing to train a model that is "
            "not what the recipe asks for"
        )
    # peft picks its bitsandbytes LoRA layers from these flags.
    model.is_loaded_in_4bit = cfg.quant.bits == 4
    model.is_loaded_in_8bit = cfg.quant.bits == 8
    return model, quantized


def checkpoint_quantization(config) -> str | None:
    """The quantization a checkpoint's config.json declares (`quant_method`), if any."""
    quant = getattr(config, "quantization_config", None)
    if isinstance(quant, dict):
        return quant.get("quant_method")
    return getattr(quant, "quant_method", None)


def dequantized_for_training(config) -> dict:
    """from_pretrained's arguments for a checkpoint whose experts are MXFP4 (gpt-oss): they are
    dequantized to the compute dtype as they load, with one line saying so (transformers' MXFP4
    kernels have no backward, and LoRA trains on the experts)."""
    if checkpoint_quantization(config) != "mxfp4":
        return {}
    from transformers import Mxfp4Config

    print(
        "model.name_or_path: the checkpoint's experts are MXFP4; they are dequantized to the "
        "compute dtype for training",
        flush=True,
    )
    return {"quantization_config": Mxfp4Config(dequantize=True)}


def load_base(
    cfg, device: torch.device, deepspeed_zero3: bool = False, attn: str | None = None
) -> tuple[nn.Module, int]:
    """The base model for cfg.method on device; returns (model, quantized linear layers)."""
    from transformers import AutoModelForCausalLM

    source = model_source(cfg.model)
    attn = attn or attention_implementation(cfg, device)
    if method_of(cfg).quantized_base:
        return load_quantized(cfg, source, device, attn)
    if attn == "flex_attention":
        attn = transformers_attention(attn, load_config(cfg.model).model_type)
    # On a GPU, load straight onto it (not a full host-RAM copy per process); ZeRO-3
    # partitions the weights itself while loading.
    direct = device.type == "cuda" and not deepspeed_zero3
    config = load_config(cfg.model)
    model = AutoModelForCausalLM.from_pretrained(
        source,
        revision=model_revision(cfg.model),
        trust_remote_code=cfg.model.trust_remote_code,
        dtype=weights_dtype(cfg, device),
        attn_implementation=attn,
        use_safetensors=True,
        device_map={"": device} if direct else None,
        **dequantized_for_training(config),
    )
    if not direct and not deepspeed_zero3:
        model.to(device)
    return model, 0


def transformers_model(model: nn.Module) -> nn.Module:
    """The transformers PreTrainedModel under a peft wrapper (or the model itself)."""
    from transformers import PreTrainedModel

    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            return module
    return model


def apply_checkpointing(model: nn.Module, layers: list[nn.Module], count: int) -> None:
    """Activation checkpointing (non-reentrant) on the first `count` decoder layers only; the
    rest keep their activations. Inputs get requires_grad so a frozen embedding still lets
    gradients reach the checkpointed adapters."""
    if count <= 0:
        return
    inner = transformers_model(model)
    enable = getattr(inner, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:  # transformers before the activation_checkpointing_* names
        inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    inner.enable_input_require_grads()
    for index, layer in enumerate(layers):
        if hasattr(layer, "gradient_checkpointing"):
            layer.gradient_checkpointing = index < count


def checkpointed_layers(layers: list[nn.Module]) -> int:
    """How many decoder layers recompute their activations in backward."""
    return sum(bool(getattr(layer, "gradient_checkpointing", False)) for layer in layers)


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters; a 4-bit weight counts as in x out, not its packed size."""
    import importlib.util

    packed: tuple[type, ...] = ()
    if importlib.util.find_spec("bitsandbytes") is not None:
        import bitsandbytes as bnb

        packed = (bnb.nn.Linear4bit,)
    total = trainable = 0
    seen = set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            n = p.ds_numel if hasattr(p, "ds_numel") else p.numel()
            if packed and isinstance(module, packed) and name == "weight":
                n = module.in_features * module.out_features  # type: ignore[attr-defined]
            total += n
            trainable += n if p.requires_grad else 0
    return trainable, total
