"""What a training run writes and reads back: checkpoints every train.save_steps and resuming
from the newest complete one (format: checkpoint.py), and the finished adapter or weights with
the tokenizer and the base-model record."""

from __future__ import annotations

from pathlib import Path

import torch.distributed as dist

from ..artifacts import (
    BaseModelRecord,
)
from ..config import RunConfig
from ..errors import UserError
from ..methods import method_of
from . import checkpoint as ckpt
from .build import is_zero3, trainable_named, unwrap
from .metrics import fsdp_record
from .parallel import World, all_reduce_max, every_rank


def gathered_trainable(model) -> dict:
    """Full copies of the trainable tensors of a ZeRO-3 model (a collective: every rank calls)."""
    import deepspeed

    named = trainable_named(model)
    with deepspeed.zero.GatheredParameters(list(named.values()), modifier_rank=None):
        return {n: p.detach().cpu().clone() for n, p in named.items()}


def restore_optimizer(optimizer, saved: dict) -> None:
    """Load optimizer state saved as local shards, re-wrapping them as DTensors for FSDP2."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, values in saved["state"].items():
        param = params[int(index)]
        if hasattr(param, "device_mesh"):
            from torch.distributed.tensor import DTensor

            for key, value in list(values.items()):
                if key != "step" and value.dim() > 0:
                    values[key] = DTensor.from_local(
                        value.to(param.to_local().device), param.device_mesh, param.placements
                    )
    saved["state"] = {int(k): v for k, v in saved["state"].items()}
    optimizer.load_state_dict(saved)


def verified_checkpoint(output: Path, world: World, before: int | None = None) -> Path | None:
    """The newest complete checkpoint (older than step `before`, when given) whose files match
    their checksums on every rank; each one that does not is said and moved aside."""
    for folder in ckpt.complete_checkpoints(output):
        if before is not None and ckpt.read_step(folder) >= before:
            continue
        problem = ckpt.verify(folder, world.rank)
        failed = [
            rank for rank, (bad,) in enumerate(every_rank([float(bool(problem))], world)) if bad
        ]
        if not failed:
            return folder
        if problem:
            print(f"rank {world.rank}: {folder}: {problem}", flush=True)
        dist.barrier()  # every rank said what it found before rank 0 moves the folder
        if world.main:
            aside = ckpt.set_aside(folder)
            print(
                f"{folder} failed its checksums on rank(s) {', '.join(map(str, failed))}: "
                f"moved aside to {aside.name}; trying the checkpoint before it",
                flush=True,
            )
        dist.barrier()
    return None


def resume(
    cfg: RunConfig,
    output: Path,
    world: World,
    model,
    optimizer,
    scheduler,
    steps: int,
    before: int | None = None,
) -> tuple[int, list, dict]:
    """(first step, losses so far, trainer state) from the newest complete checkpoint whose
    checksums match (older than step `before`: a spike guard's rollback), or (0, [], {})."""
    if world.main:
        ckpt.remove_partial(output)  # a failed save's leftovers: free their space first
    had = ckpt.latest_checkpoint(output)
    latest = verified_checkpoint(output, world, before)
    if latest is None:
        if had is not None and world.main and before is None:
            print(
                f"no checkpoint in {output / 'checkpoints'} passed its checksums: training "
                "starts again from step 0",
                flush=True,
            )
        return 0, [], {}
    state, params, optim, tensors = ckpt.load_checkpoint(latest, world.rank)
    if state["world_size"] != world.size or state["strategy"] != cfg.distributed.strategy:
        raise UserError(
            f"{latest}: written by {state['world_size']} {state['strategy']} "
            f"processes; this run has {world.size} {cfg.distributed.strategy}"
        )
    if is_zero3(cfg):
        import deepspeed

        named = trainable_named(model)
        with deepspeed.zero.GatheredParameters(list(named.values()), modifier_rank=0):
            if world.main:
                ckpt.restore_params(named, params)
    else:
        ckpt.restore_params(trainable_named(model), params)
    if optim is not None:
        restore_optimizer(optimizer, optim)
    scheduler.load_state_dict(
        {**scheduler.state_dict(), "last_epoch": state["step"], "_step_count": state["step"] + 1}
    )
    ckpt.restore_rng(tensors)
    if world.main:
        print(f"resuming from {latest} (step {state['step']} of {steps})", flush=True)
    return state["step"], state["loss"], state


def save_checkpoint(
    cfg: RunConfig, output, done, world, model, optimizer, losses, steps, skipped=()
) -> Path:
    """Every rank's part of the checkpoint of step `done`; its folder."""
    is_ds = cfg.distributed.strategy == "deepspeed"
    optim_state = None if is_ds else optimizer.state_dict()
    params = gathered_trainable(model) if is_zero3(cfg) else trainable_named(model)
    return ckpt.save_checkpoint(
        output,
        done,
        world.rank,
        params,
        optim_state,
        {
            "step": done,
            "loss": losses,
            "world_size": world.size,
            "strategy": cfg.distributed.strategy,
            "fsdp": fsdp_record(cfg, model),
            "steps": steps,
            "micro_batch_size": cfg.train.micro_batch_size,
            "grad_accum": cfg.train.grad_accum,
            "skipped": [list(s) for s in skipped],  # steps skipped: non-finite or spikes
        },
        agree=lambda value: all_reduce_max(value, world),
        keep=cfg.train.keep_checkpoints,
    )


def save_outputs(
    cfg, model, tokenizer, output: Path, world: World, fingerprint: str | None
) -> None:
    """Adapter (LoRA/QLoRA, LLaMA-Adapter) or full weights as safetensors, on rank 0, plus the
    tokenizer."""
    strategy, method = cfg.distributed.strategy, method_of(cfg)
    base = unwrap(model)
    state = None
    if strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(
            model,
            options=StateDictOptions(
                full_state_dict=True, cpu_offload=True, ignore_frozen_params=not method.trains_base
            ),
        )
    elif is_zero3(cfg):
        whole = method.trains_base
        state = model._zero3_consolidated_16bit_state_dict() if whole else gathered_trainable(model)
    if world.main:  # a PeftModel writes only the adapter; a full model all its weights
        method.save(cfg, base, state, output)
        tokenizer.save_pretrained(output)
        # Which base and data this model came from: merge checks the base, push records both.
        BaseModelRecord(
            name_or_path=cfg.model.name_or_path,
            revision=cfg.model.revision,
            commit=cfg.model.commit,
            method=cfg.method,
            dataset_fingerprint=fingerprint,
        ).write(output)
    dist.barrier()
