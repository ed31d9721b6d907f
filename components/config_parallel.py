"""The recipe's `distributed` section (strategy, processes, ZeRO, FSDP, the collectives'
timeout); config_sections.py re-exports it."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .config_measure import Section


class FsdpConfig(Section):
    sharding: Literal["full", "shard_grad_op", "no_shard", "hybrid"] = Field(
        "full",
        description="full: weights, gradients and optimizer state sharded over every process, "
        "weights gathered per layer (ZeRO-3); shard_grad_op: weights stay gathered from forward "
        "to backward (ZeRO-2, fewer all-gathers); no_shard: a replica per process (DDP); hybrid: "
        "shard inside a node, replicate across nodes (HSDP).",
    )
    cpu_offload: bool = Field(
        False,
        description="Keep sharded weights, gradients and optimizer state in CPU memory; the "
        "optimizer steps on the CPU (FSDP2 CPUOffloadPolicy).",
    )


class DistributedConfig(Section):
    strategy: Literal["ddp", "fsdp", "deepspeed"] = Field(
        "ddp", description="ddp: a replica per GPU; fsdp; deepspeed ZeRO."
    )
    nodes: int = Field(1, gt=0, description="Machines (PyTorchJob Master + nodes-1 Workers).")
    procs_per_node: int = Field(1, gt=0, description="Processes per node, one per GPU.")
    backend: Literal["local", "pytorchjob", "trainjob"] = Field(
        "local",
        description="local: torchrun here; pytorchjob: a PyTorchJob (Kubeflow Training "
        "Operator v1); trainjob: a TrainJob (Kubeflow Trainer v2) over kubernetes.runtime.",
    )
    zero_stage: Literal[2, 3] = Field(3, description="deepspeed: ZeRO stage.")
    offload: Literal["none", "optimizer", "optimizer+params"] = Field(
        "none", description="deepspeed: CPU offload."
    )
    fsdp: FsdpConfig = Field(default_factory=FsdpConfig)
    timeout_minutes: float = Field(
        30.0,
        gt=0,
        description="How long a rank waits for the others in a collective (the process group's "
        "timeout) and how long one step, evaluation or checkpoint may go without progress: "
        "past it every rank stops with one line naming the step and the rank that did not "
        "arrive, never a silent hang.",
    )
    low_memory_load: bool = Field(
        True,
        description="fsdp with lora/full: only rank 0 reads the checkpoint; the other ranks "
        "build on the meta device and receive their shards (llama-recipes' low_cpu_fsdp).",
    )

    @property
    def world_size(self) -> int:
        """Training processes over every node: one per GPU."""
        return self.nodes * self.procs_per_node
