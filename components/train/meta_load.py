"""Low-memory FSDP loading (llama-recipes' low_cpu_fsdp), for lora and full fine-tuning.

Every rank builds the model on the meta device (no memory), adds LoRA and shards it with FSDP;
then the shards get their values: rank 0 alone opens the safetensors checkpoint and streams it
tensor by tensor, each tensor scattered so that every rank keeps only its own shard. No process
ever holds the whole model, and the other ranks never read the checkpoint. LoRA weights (not in
the checkpoint) are initialised on rank 0 as peft does (A Kaiming-uniform, B zero), LLaMA-Adapter
ones as llama_adapter builds them, and scattered the same way. Buffers computed at construction
(rotary frequencies) are kept as built.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

from ..errors import UserError
from ..methods.llama_adapter import initial_value as adapter_init
from ..methods.llama_adapter import is_added
from ..models import model_revision, model_source, safetensors_files
from .experts4bit import ExpertStacks, Mxfp4Experts

if TYPE_CHECKING:
    from ..config import RunConfig


def checkpoint_name(name: str) -> str:
    """A (peft-wrapped) model parameter's name as the base checkpoint stores it."""
    name = name.removeprefix("base_model.model.")
    while ".base_layer." in name:  # peft nests its parameter LoRA wrappers
        name = name.replace(".base_layer.", ".")
    return name


def _broadcast(obj):
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


@torch.no_grad()
def _scatter_into(param: torch.Tensor, full: torch.Tensor | None, device) -> None:
    """Give every rank its part of `full` (present on rank 0 only) inside `param`."""
    if full is None:
        full = torch.empty(param.shape, dtype=param.dtype, device=device)
    else:
        full = full.to(device=device, dtype=param.dtype)
    if hasattr(param, "device_mesh"):  # an FSDP2 DTensor: keep only this rank's shard
        from torch.distributed.tensor import distribute_tensor

        shard = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=0)
        param.to_local().copy_(shard.to_local())
    else:
        dist.broadcast(full, src=0)
        param.copy_(full)


def lora_init(name: str, shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
    """peft's default LoRA init: A Kaiming-uniform (a=sqrt(5)), B zeros."""
    tensor = torch.empty(shape, dtype=torch.float32)
    if ".lora_A." in name:
        nn.init.kaiming_uniform_(tensor, a=math.sqrt(5), generator=generator)
    elif ".lora_B." in name:
        tensor.zero_()
    else:
        raise RuntimeError(f"no initialiser for {name}")
    return tensor


def materialize(model: nn.Module, cfg: RunConfig, world) -> None:
    """After fully_shard on a meta-built model: allocate the shards and fill them (see above)."""
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    model.to_empty(device=world.device)
    for name, value in buffers.items():
        module_name, _, attr = name.rpartition(".")
        model.get_submodule(module_name)._buffers[attr] = value.to(world.device)
    params = dict(model.named_parameters())
    by_checkpoint = {checkpoint_name(n): n for n in params if not added(n)}
    files = (
        safetensors_files(model_source(cfg.model), model_revision(cfg.model)) if world.main else []
    )
    assemblers = (expert_stacks(model, by_checkpoint), Mxfp4Experts(by_checkpoint))
    loaded: set[str] = set()
    for index in range(_broadcast(len(files))):
        from safetensors import safe_open

        handle = safe_open(str(files[index]), framework="pt") if world.main else None
        ready = dict(shard_tensors(handle, by_checkpoint, assemblers)) if handle else {}
        for key in _broadcast(list(ready) if handle else None):
            name = by_checkpoint[key]
            value = ready.get(key)
            tensor = handle.get_tensor(value) if handle and isinstance(value, str) else value
            _scatter_into(params[name], tensor, world.device)
            loaded.add(name)
    missing = [n for n in by_checkpoint.values() if n not in loaded]
    if missing:
        raise UserError(
            f"model.name_or_path: the checkpoint has no tensor for "
            f"{', '.join(checkpoint_name(n) for n in missing[:5])}"
        )
    generator = torch.Generator().manual_seed(cfg.train.seed)
    for name in [n for n in params if added(n)]:
        init = None
        if world.main:
            shape = params[name].shape
            init = (
                lora_init(name, shape, generator)
                if "lora_" in name
                else adapter_init(name, shape, generator)
            )
        _scatter_into(params[name], init, world.device)


def shard_tensors(handle, by_checkpoint: dict[str, str], assemblers):
    """(checkpoint name, its key in the shard or the tensor assembled) for every tensor of one
    shard the model takes: its own, or a fused expert tensor the shard completes (per-expert
    tensors stacked, MXFP4 blocks dequantized)."""
    for key in list(handle.keys()):  # noqa: SIM118 (safe_open is not a dict)
        if key in by_checkpoint:
            yield key, key
            continue
        for assembler in assemblers:
            if assembler.needs(key):
                yield from assembler.take(key, handle.get_tensor(key))


def expert_stacks(model: nn.Module, by_checkpoint: dict[str, str]) -> ExpertStacks:
    """The assembler of the model's fused experts from a checkpoint that stores them one tensor
    per expert (the hub's layout)."""
    from ..architectures import family

    record = family(model.config.model_type)
    params = dict(model.named_parameters())
    wanted = {
        key: params[name].shape[0]
        for key, name in by_checkpoint.items()
        if key.endswith((".experts.gate_up_proj", ".experts.down_proj"))
    }
    return ExpertStacks(wanted, record.experts_4bit, record.checkpoint_renames)


def added(name: str) -> bool:
    """A parameter the method adds to the base (LoRA, LLaMA-Adapter): not in the checkpoint."""
    return "lora_" in name or is_added(name)
