"""Process group, device, and the three ways of spreading a model over processes.

- ddp: a whole replica per process (QLoRA's data parallelism); gradients all-reduced.
- fsdp: PyTorch FSDP2 (`fully_shard`) per decoder layer, then the root; parameters sharded.
- deepspeed: ZeRO stage 2 or 3, optimizer (and for stage 3 parameter) offload to CPU.
All run on CPU with gloo (DeepSpeed with DS_ACCELERATOR=cpu) as well as on GPUs with NCCL.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

from ..architectures import decoder_layers

if TYPE_CHECKING:
    from ..config import RunConfig


@dataclass
class World:
    rank: int
    local_rank: int
    size: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_world(timeout_minutes: float | None = None) -> World:
    """Read torchrun's / the Training Operator's environment and join the process group, whose
    collectives give up after `timeout_minutes` (distributed.timeout_minutes)."""
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if "MASTER_ADDR" not in os.environ:  # a single process started by hand
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29500", RANK="0", WORLD_SIZE="1")
    timeout = None if timeout_minutes is None else timedelta(minutes=timeout_minutes)
    dist.init_process_group(backend, rank=rank, world_size=size, timeout=timeout)
    return World(rank, local_rank, size, device)


def wrap_ddp(model: nn.Module, world: World) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    ids = [world.local_rank] if world.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def fsdp_mesh(sharding: str, world: World, procs_per_node: int):
    """The device mesh of a sharding strategy: None (every process, 1-D) for full and
    shard_grad_op; (replicate, shard) 2-D meshes for no_shard (shard groups of 1) and hybrid
    (shard groups of one node's processes)."""
    if sharding in ("full", "shard_grad_op"):
        return None
    from torch.distributed.device_mesh import init_device_mesh

    shard = 1 if sharding == "no_shard" else procs_per_node
    if world.size % shard:
        raise RuntimeError(f"{world.size} processes do not split into groups of {shard}")
    return init_device_mesh(
        world.device.type, (world.size // shard, shard), mesh_dim_names=("replicate", "shard")
    )


def wrap_fsdp(
    model: nn.Module, world: World, dtype: torch.dtype, fsdp=None, procs_per_node: int = 1
) -> nn.Module:
    """FSDP2 per decoder layer, then the root, with the recipe's sharding and offload."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    sharding = fsdp.sharding if fsdp is not None else "full"
    options = {
        "mp_policy": MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32),
        "mesh": fsdp_mesh(sharding, world, procs_per_node),
        # shard_grad_op keeps each layer's gathered weights from its forward to its backward
        "reshard_after_forward": sharding != "shard_grad_op",
    }
    if fsdp is not None and fsdp.cpu_offload:
        options["offload_policy"] = CPUOffloadPolicy(pin_memory=world.device.type == "cuda")
    layers = decoder_layers(model)
    if not layers:
        raise RuntimeError("no decoder layers found to shard")
    for layer in layers:
        fully_shard(layer, **options)
    fully_shard(model, **options)
    return model


def fsdp_layout(model: nn.Module) -> dict | None:
    """How FSDP2 laid the parameters out (for metrics.json): the mesh's shape and a
    parameter's placements, e.g. [2, 1] and Replicate/Shard for no_shard on 2 processes."""
    for param in model.parameters():
        if hasattr(param, "device_mesh"):
            return {
                "mesh": list(param.device_mesh.shape),
                "placements": [repr(p) for p in param.placements],
            }
    return None


def no_shm_op_on_cpu(world: World) -> None:
    """On the CPU, keep DeepSpeed from JIT-compiling its shared-memory all-reduce op (two
    minutes on a fresh machine) when its comm backend starts: the gloo process group already
    running does that work. Call before anything of DeepSpeed's runs."""
    if world.device.type == "cpu":
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def deepspeed_config(cfg: RunConfig, world: World, bf16: bool) -> dict:
    zero = {
        "stage": cfg.distributed.zero_stage,
        "overlap_comm": world.device.type == "cuda",
        "contiguous_gradients": True,
    }
    if cfg.distributed.offload in ("optimizer", "optimizer+params"):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": world.device.type == "cuda"}
    if cfg.distributed.offload == "optimizer+params":
        zero["offload_param"] = {"device": "cpu", "pin_memory": world.device.type == "cuda"}
    if cfg.distributed.zero_stage == 3:
        zero.update(
            stage3_gather_16bit_weights_on_model_save=False, stage3_param_persistence_threshold=0
        )
    return {
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": cfg.train.grad_accum,
        "gradient_clipping": cfg.train.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": cfg.train.lr,
                "betas": [0.9, 0.999],
                "eps": 1e-8,
                "weight_decay": cfg.train.weight_decay,
                # on a CPU-only machine: torch's AdamW, not DeepSpeed's FusedAdam or CPUAdam,
                # whose ops are JIT-compiled (minutes of a fresh machine's two cores) and gain
                # nothing where the model already lives in CPU memory; on GPUs an offloaded
                # optimizer steps with DeepSpeedCPUAdam, as DeepSpeed recommends
                "torch_adam": world.device.type == "cpu",
            },
        },
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def every_rank(row: list, world: World) -> list[list[float]]:
    """Every rank's `row` (floats or 0-d tensors, on the device: no host sync before the
    collective), by rank: one all-reduce of a table where each rank fills its own row."""
    table = torch.zeros(
        world.size,
        len(row),
        dtype=torch.float64,
        device=world.device if world.device.type == "cuda" else "cpu",
    )
    for column, value in enumerate(row):
        table[world.rank, column] = value
    dist.all_reduce(table)
    return table.cpu().tolist()


def all_reduce_sum(value: float, world: World) -> float:
    t = torch.tensor(
        [float(value)],
        dtype=torch.float64,
        device=world.device if world.device.type == "cuda" else "cpu",
    )
    dist.all_reduce(t)
    return float(t.item())


def all_reduce_max(value: float, world: World) -> float:
    t = torch.tensor(
        [float(value)],
        dtype=torch.float64,
        device=world.device if world.device.type == "cuda" else "cpu",
    )
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())
