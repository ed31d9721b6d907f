"""The training worker: one process per GPU (or per CPU slot), started by torchrun.

    torchrun ... -m kubetune.components.train.worker --recipe R --dataset D --output O

It reads as one story: join the process group → load the base model (quantized for qlora) →
add LoRA → shard (ddp / fsdp / deepspeed) → resume from the newest complete checkpoint →
train (accumulation, clipping, warmup + schedule) → checkpoint every train.save_steps →
evaluate → save the adapter or full weights, the tokenizer, the recipe and metrics.json.
Everything comes from the recipe, these arguments and the environment that torchrun or the
Training Operator sets, so a PyTorchJob pod runs exactly this command.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import time
from contextlib import nullcontext, suppress
from pathlib import Path

import torch
import torch.distributed as dist

from ..artifacts import (
    IGNORE_INDEX,
    METRICS_FILE,
    STATS_FILE,
    BaseModelRecord,
    ProgressLine,
    write_json,
)
from ..config import ADAPTER_METHODS, load_recipe, parse_recipe, write_resolved
from ..console import quiet_progress_off_terminal
from ..errors import UserError
from ..llama_adapter import AdapterSpec
from ..llama_adapter import install as install_adapter
from ..llama_adapter import save as save_adapter
from ..models import decoder_layers
from . import checkpoint as ckpt
from .attention import FLEX, attention_implementation, use_flex_attention
from .data import (
    COUNTS,
    BatchPlan,
    batch_loader,
    check_rows,
    collate,
    document_block_mask,
    pad_length,
    total_steps,
)
from .entry import ERROR_FILE
from .fit import Fit, as_set, resolved
from .flops import mfu, train_flops_per_token
from .fused_lora import fuse_lora
from .kernels import apply_kernels, compile_layers, select_kernels
from .measure import StepFlops, check_fits, start_profiler
from .meta_load import materialize
from .modeling import (
    DTYPES,
    add_lora,
    apply_checkpointing,
    build_on_meta,
    checkpointed_layers,
    freeze_bottom,
    load_base,
    parameter_counts,
    weights_dtype,
)
from .parallel import (
    World,
    all_reduce_max,
    all_reduce_sum,
    deepspeed_config,
    fsdp_layout,
    init_world,
    no_shm_op_on_cpu,
    wrap_ddp,
    wrap_fsdp,
)
from .progress import LossLog, synchronize
from .status import Figures, TrainerStatus

WARMUP_STEPS = 5  # steps left out of steady_tokens_per_second


def lr_lambda(cfg, steps: int):
    warmup = cfg.train.warmup_steps

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        if cfg.train.lr_scheduler == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        if cfg.train.lr_scheduler == "linear":
            return max(0.0, 1.0 - progress)
        return 1.0

    return factor


def low_memory_fsdp(cfg) -> bool:
    """FSDP lora/full with distributed.low_memory_load: build on meta, rank 0 streams weights."""
    return (
        cfg.distributed.strategy == "fsdp"
        and cfg.distributed.low_memory_load
        and cfg.method != "qlora"
    )


def build_model(cfg, world: World, attn: str, fit: Fit, packed: bool):
    """Base model (+ kernels, + LoRA or adapters, + checkpointing, + compiled layers), not yet
    sharded. Frozen weights stay in the compute dtype; trainable LoRA/adapter weights are
    fp32 (master weights) for lora/qlora/adapters."""
    zero3 = is_zero3(cfg)
    dtype = weights_dtype(cfg, world.device)
    ds_config = None
    if cfg.distributed.strategy == "deepspeed":
        no_shm_op_on_cpu(world)
        ds_config = deepspeed_config(cfg, world, dtype == torch.bfloat16)
    hf_ds = None
    if zero3:  # transformers then builds the model straight into ZeRO-3 partitions
        from transformers.integrations import HfDeepSpeedConfig

        hf_ds = HfDeepSpeedConfig(ds_config)  # noqa: F841 (must stay alive while loading)
    if low_memory_fsdp(cfg):
        model, quantized = build_on_meta(cfg, dtype, attn), 0
    else:
        model, quantized = load_base(cfg, world.device, deepspeed_zero3=zero3, attn=attn)
    if attn == FLEX:
        use_flex_attention(model)
    kernels = select_kernels(cfg, world.device, model.config.model_type, packed)
    apply_kernels(model, kernels)
    if cfg.method in ("lora", "qlora"):
        model = add_lora(cfg, model)
        if kernels.lora == "fused":
            fuse_lora(model)
    elif cfg.method in ADAPTER_METHODS:
        install_adapter(model, AdapterSpec.from_recipe(cfg))
    else:
        freeze_bottom(model, cfg.train.freeze_layers)
    layers = decoder_layers(model)
    apply_checkpointing(model, layers, fit.checkpointed_layers)
    model.config.use_cache = False
    if kernels.compile:
        compile_layers(layers, log=print if world.main else (lambda message: None))
    trainable, total = parameter_counts(model)
    return model, quantized, trainable, total, dtype, ds_config, kernels


def fit_run(cfg, world: World, rows: int, output: Path) -> Fit:
    """The micro batch and the checkpointed layers (fit.py), from the plan on this GPU. A
    resumed run keeps the micro batch and grad_accum its checkpoint was written with: the
    data order depends on them."""
    from .plan import estimate

    memory = None
    if world.device.type == "cuda":
        memory = float(torch.cuda.get_device_properties(world.device).total_memory)
    train = cfg.train
    latest = ckpt.latest_checkpoint(output)
    if latest is not None and train.micro_batch_size == "auto":
        state = ckpt.read_state(latest)
        if "micro_batch_size" in state:
            train = train.model_copy(
                update={
                    "micro_batch_size": state["micro_batch_size"],
                    "grad_accum": state["grad_accum"],
                }
            )
            cfg = cfg.model_copy(update={"train": train})
    dtype_bytes = 4 if weights_dtype(cfg, world.device) == torch.float32 else 2
    try:
        return estimate(cfg, world.size, dtype_bytes, memory, rows // world.size).fit
    except Exception as exc:  # an architecture the plan cannot build on the meta device
        if "auto" in (train.micro_batch_size, train.gradient_checkpointing):
            raise UserError(
                f"train.micro_batch_size / train.gradient_checkpointing: auto needs kubetune's "
                f"memory plan, which failed for this model ({exc}); set them explicitly"
            ) from None
        from ..models import load_config

        return as_set(cfg, load_config(cfg.model).num_hidden_layers, str(exc).splitlines()[0])


def wrap(cfg, model, world: World, dtype, ds_config, steps: int):
    """(engine or wrapped model, optimizer, scheduler) for the strategy."""
    strategy = cfg.distributed.strategy
    if strategy == "deepspeed":
        import deepspeed

        engine, optimizer, _, scheduler = deepspeed.initialize(
            model=model,
            model_parameters=[p for p in model.parameters() if p.requires_grad],
            config=ds_config,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, steps)),
        )
        return engine, optimizer, scheduler
    if strategy == "fsdp":
        # 4-bit weights are stored in the compute dtype: gather them in it, unconverted.
        param_dtype = DTYPES[cfg.quant.compute_dtype] if cfg.method == "qlora" else dtype
        dist_cfg = cfg.distributed
        model = wrap_fsdp(model, world, param_dtype, dist_cfg.fsdp, dist_cfg.procs_per_node)
        if low_memory_fsdp(cfg):
            materialize(model, cfg, world)
    elif world.size > 1:
        model = wrap_ddp(model, world)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params,
        lr=cfg.train.lr,
        weight_decay=cfg.train.weight_decay,
        fused=world.device.type == "cuda",
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, steps))
    return model, optimizer, scheduler


def unwrap(model):
    return model.module if hasattr(model, "module") else model


def trainable_named(model) -> dict:
    return {n: p for n, p in unwrap(model).named_parameters() if p.requires_grad}


def is_zero3(cfg) -> bool:
    return cfg.distributed.strategy == "deepspeed" and cfg.distributed.zero_stage == 3


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


def forward_loss(model, batch: dict, device, attn: str) -> torch.Tensor:
    inputs = {k: v.to(device, non_blocking=True) for k, v in batch.items() if k not in COUNTS}
    if attn == FLEX:  # packed rows: a sparse document mask, built on the device
        inputs["attention_mask"] = document_block_mask(inputs["position_ids"])
    return model(**inputs).loss


@torch.no_grad()
def evaluate(cfg, model, split, world: World, pad_id: int, attn: str, dtype) -> float | None:
    """Token-weighted mean loss over the eval split, sharded across ranks.

    Every rank runs the same number of forwards (FSDP and ZeRO-3 forwards are collectives); a
    rank whose share has run out repeats a row and discards the result."""
    if split is None or len(split) == 0:
        return None
    model.eval()
    pad_to = pad_length(attn, cfg.data.max_seq_len)
    loss_sum = tokens = 0.0
    indices = list(range(world.rank, len(split), world.size))
    size = cfg.train.micro_batch_size
    batches = math.ceil(math.ceil(len(split) / world.size) / size)
    for b in range(batches):
        chunk = indices[b * size : (b + 1) * size]
        batch = collate([split[i] for i in chunk or [0]], pad_id, attn, dtype, pad_to)
        loss = forward_loss(model, batch, world.device, attn)
        if chunk:
            n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
            loss_sum += float(loss) * n
            tokens += n
    model.train()
    total = all_reduce_sum(tokens, world)
    return all_reduce_sum(loss_sum, world) / total if total else None


def peak_memory(world: World) -> int:
    if world.device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(world.device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def save_outputs(
    cfg, model, tokenizer, output: Path, world: World, fingerprint: str | None
) -> None:
    """Adapter (LoRA/QLoRA, LLaMA-Adapter) or full weights as safetensors, on rank 0, plus the
    tokenizer."""
    strategy = cfg.distributed.strategy
    base = unwrap(model)
    state = None
    if strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(
            model,
            options=StateDictOptions(
                full_state_dict=True, cpu_offload=True, ignore_frozen_params=cfg.method != "full"
            ),
        )
    elif is_zero3(cfg):
        full = cfg.method == "full"
        state = model._zero3_consolidated_16bit_state_dict() if full else gathered_trainable(model)
    if world.main and cfg.method in ADAPTER_METHODS:
        # only the trained tensors (FSDP's state dict also names a head tied to frozen inputs)
        trained = trainable_named(base)
        state = {k: v for k, v in state.items() if k in trained} if state else trained
        save_adapter(output, AdapterSpec.from_recipe(cfg), state)
    elif world.main:  # a PeftModel writes only the adapter; a full model all its weights
        base.save_pretrained(output, state_dict=state, safe_serialization=True)
    if world.main:
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


def parse_args(argv):
    parser = argparse.ArgumentParser(description="kubetune training worker (run by torchrun)")
    parser.add_argument("--recipe", required=True)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    return parser.parse_args(argv)


def recipe_from_arg(arg: str, overrides: list[str]):
    """`--recipe PATH`, or `--recipe env:NAME` for a recipe carried in an environment variable
    (how a PyTorchJob hands every pod the resolved recipe)."""
    if arg.startswith("env:"):
        name = arg[len("env:") :]
        text = os.environ.get(name)
        if not text:
            raise UserError(f"--recipe {arg}: the environment variable {name} is not set")
        return parse_recipe(text, f"${name}", overrides)
    return load_recipe(arg, overrides)


def resume(cfg, output: Path, world: World, model, optimizer, scheduler, steps: int):
    """(first step, losses so far) from the newest complete checkpoint, or (0, [])."""
    latest = ckpt.latest_checkpoint(output)
    if latest is None:
        return 0, []
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
    return state["step"], state["loss"]


def dataset_stats(dataset: str) -> dict:
    stats_file = Path(dataset) / STATS_FILE
    return json.loads(stats_file.read_text()) if stats_file.is_file() else {}


def run(args) -> None:
    cfg = recipe_from_arg(args.recipe, args.overrides)
    output, world = Path(args.output), init_world()
    torch.manual_seed(cfg.train.seed)
    from datasets import load_from_disk

    from ..models import load_tokenizer

    data = load_from_disk(args.dataset)
    train_split, eval_split = data["train"], data.get("eval", None)
    stats = dataset_stats(args.dataset)
    fingerprint = stats.get("fingerprint")
    packed = bool(stats.get("packing", {}).get("enabled", cfg.data.packing))
    tokenizer = load_tokenizer(cfg.model)
    attn = attention_implementation(cfg, world.device, packed)
    fit = fit_run(cfg, world, len(train_split), output)
    cfg = resolved(cfg, fit)
    if world.main and "auto" in (fit.micro_setting, fit.checkpointing_setting):
        print(
            f"auto: micro batch {fit.micro_batch_size} x grad_accum {fit.grad_accum} "
            f"({fit.micro_reason}); gradient checkpointing on {fit.checkpointed_layers} of "
            f"{fit.layers} layers ({fit.checkpointing_reason})",
            flush=True,
        )
    model, quantized, trainable, total, dtype, ds_config, kernels = build_model(
        cfg, world, attn, fit, packed
    )
    plan = BatchPlan(
        len(train_split), cfg.train.micro_batch_size, world.rank, world.size, cfg.data.seed
    )
    check_rows(args.dataset, len(train_split), world.size, cfg.train.micro_batch_size)
    steps = total_steps(cfg, plan.per_epoch)
    check_fits(cfg, steps)
    model, optimizer, scheduler = wrap(cfg, model, world, dtype, ds_config, steps)
    is_ds = cfg.distributed.strategy == "deepspeed"
    start, losses = resume(cfg, output, world, model, optimizer, scheduler, steps)

    writer = None
    if world.main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(output / "tensorboard"))
    accum, pad_id = cfg.train.grad_accum, tokenizer.pad_token_id
    # one row length for compiled layers (packed rows): static shapes, one compile
    pad_to = pad_length(attn, cfg.data.max_seq_len) or (
        cfg.data.max_seq_len if kernels.compile and packed else 0
    )
    flops_token = train_flops_per_token(unwrap(model), total, trainable, cfg.data.max_seq_len)
    log = LossLog(world, losses, writer)
    batches = iter(
        batch_loader(
            train_split,
            plan,
            start * accum,
            steps * accum,
            pad_id,
            attn,
            dtype,
            pin=world.device.type == "cuda",
            pad_to=pad_to,
        )
    )
    trainable_params = [p for p in model.parameters() if p.requires_grad]
    ddp_accum = not is_ds and world.size > 1 and cfg.distributed.strategy == "ddp"
    rows_done, paused, padded, examples = 0.0, 0.0, 0, 0

    status = TrainerStatus.from_env(world.rank)

    def flush(wait: bool = True) -> None:
        """Record the losses that landed (all of them with `wait`); rank 0 prints their lines."""
        landed = log.flush(wait)
        if world.main:
            elapsed = time.perf_counter() - began - paused
            print_losses(landed, cfg.train.logging_steps, steps, start, log, elapsed, status)

    # Steady speed leaves out the first steps (flex_attention/Triton compiles, autotuning,
    # the allocator's growth): the figure a long run settles at.
    warm_step = start + WARMUP_STEPS if steps - start >= 2 * WARMUP_STEPS else None
    warm_seconds = warm_tokens = None
    step_flops = StepFlops(cfg, world, synchronize)
    profiler = start_profiler(cfg, world, output, steps - start)
    model.train()
    began = time.perf_counter()
    for step in range(start, steps):
        step_loss, step_tokens = None, 0
        done = step + 1
        with step_flops.around(done):
            for micro in range(accum):
                batch = next(batches)
                sync = model.no_sync() if ddp_accum and micro < accum - 1 else nullcontext()
                with sync:
                    loss = forward_loss(model, batch, world.device, attn)
                    if is_ds:
                        model.backward(loss)
                        model.step()
                    else:
                        (loss / accum).backward()
                part = loss.detach() / accum
                step_loss = part if step_loss is None else step_loss + part
                step_tokens += batch["tokens"]
                padded += batch["padded_tokens"]
                examples += batch["examples"]
            if not is_ds:
                torch.nn.utils.clip_grad_norm_(trainable_params, cfg.train.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
        step_flops.tokens_of(done, step_tokens)
        if profiler is not None:
            profiler.step()
        rows_done += world.size * accum * cfg.train.micro_batch_size
        log.add(done, step_loss, scheduler.get_last_lr()[0], step_tokens)
        evaluating = bool(cfg.train.eval_steps and done % cfg.train.eval_steps == 0)
        saving = done % cfg.train.save_steps == 0
        logging = done % cfg.train.logging_steps == 0 or done == steps
        pausing = done < steps and (evaluating or saving)
        if logging or pausing:
            # on a GPU the losses land a logging step later: no host sync in the loop
            flush(wait=pausing or done == steps)
        if done == warm_step:
            flush()
            synchronize(world)
            warm_seconds, warm_tokens = time.perf_counter() - began - paused, log.tokens
        if pausing:
            synchronize(world)
            pause = time.perf_counter()
            if evaluating:
                eval_loss = evaluate(cfg, model, eval_split, world, pad_id, attn, dtype)
                if writer is not None and eval_loss is not None:
                    writer.add_scalar("eval/loss", eval_loss, done)
            if saving:
                save_checkpoint(cfg, output, done, world, model, optimizer, losses, steps)
            paused += time.perf_counter() - pause
    flush()
    synchronize(world)
    train_seconds = time.perf_counter() - began - paused
    if profiler is not None:
        profiler.stop()
    finish(
        cfg,
        model,
        tokenizer,
        world,
        output,
        (eval_split, attn, dtype),
        writer,
        {
            "steps": steps,
            "resumed_from_step": start,
            "loss": losses,
            "tokens_per_second": log.tokens / train_seconds if start < steps else None,
            # this process's computed (padded) tokens and dataset examples, times the ranks
            "padded_tokens_per_second": (
                padded * world.size / train_seconds if start < steps else None
            ),
            "examples_per_second": (
                examples * world.size / train_seconds if start < steps else None
            ),
            "samples_per_second": rows_done / train_seconds if start < steps else None,
            "steady_tokens_per_second": (
                (log.tokens - warm_tokens) / (train_seconds - warm_seconds)
                if warm_seconds is not None
                else None
            ),
            "trainable_params": trainable,
            "total_params": total,
            "quantized_linear_modules": quantized,
            "flops_per_token": flops_token,
            "flop_counter": step_flops.report(flops_token),
            "method": cfg.method,
            "strategy": cfg.distributed.strategy,
            "fsdp": fsdp_record(cfg, model),
            "world_size": world.size,
            "device": str(world.device.type),
            "attn_implementation": attn,
            "kernels": kernels.as_dict(),
            "gradient_checkpointing": {
                **fit.checkpointing_record(),
                "layers": checkpointed_layers(decoder_layers(unwrap(model))),
            },
            "micro_batch": fit.micro_record(world.size),
            "precision": precision_record(unwrap(model)),
            "train_seconds": round(train_seconds, 3),
            "dataset_fingerprint": fingerprint,
        },
    )


def print_losses(
    landed, every: int, steps: int, start: int, log: LossLog, elapsed: float, status=None
):
    """The `step N/M loss X ... progress P% eta T` lines of the logging steps among the losses
    that just landed; the same figures go to the TrainJob's status (`status`, at most every
    5 s, and always the last step's)."""
    for step, loss, lr in landed:
        if step % every == 0 or step == steps:
            figures = Figures.of(step, steps, start, loss, log.tokens, elapsed)
            line = ProgressLine(
                step, steps, loss, lr, figures.tokens_per_second, figures.percent, figures.eta()
            )
            print(line.format(), flush=True)
            if status is not None:
                status.report(figures, force=step == steps)


def precision_record(model) -> dict:
    """The dtypes of the frozen and the trainable tensors, by element count (4-bit weights
    count as their packed storage dtype)."""
    frozen: dict[str, int] = {}
    trained: dict[str, int] = {}
    seen = set()
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        table = trained if p.requires_grad else frozen
        name = str(p.dtype).removeprefix("torch.")
        table[name] = table.get(name, 0) + p.numel()
    return {"frozen": frozen, "trainable": trained}


def fsdp_record(cfg, model) -> dict | None:
    """What metrics.json and checkpoints record of FSDP: the options and the mesh that ran."""
    if cfg.distributed.strategy != "fsdp":
        return None
    fsdp = cfg.distributed.fsdp
    return {
        "sharding": fsdp.sharding,
        "cpu_offload": fsdp.cpu_offload,
        **(fsdp_layout(model) or {}),
    }


def save_checkpoint(cfg, output, done, world, model, optimizer, losses, steps) -> None:
    is_ds = cfg.distributed.strategy == "deepspeed"
    optim_state = None if is_ds else optimizer.state_dict()
    params = gathered_trainable(model) if is_zero3(cfg) else trainable_named(model)
    ckpt.save_checkpoint(
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
        },
    )


def finish(cfg, model, tokenizer, world, output, evaluation, writer, metrics) -> None:
    """Final eval, the adapter or weights, then metrics.json (last: it marks a finished run)."""
    eval_split, attn, dtype = evaluation
    eval_loss = evaluate(cfg, model, eval_split, world, tokenizer.pad_token_id, attn, dtype)
    save_outputs(cfg, model, tokenizer, output, world, metrics["dataset_fingerprint"])
    peak = all_reduce_max(peak_memory(world), world)
    if world.main:
        tps = metrics["tokens_per_second"]
        flops_token = metrics.pop("flops_per_token")
        metrics.update(
            eval_loss=eval_loss,
            peak_memory_bytes=int(peak),
            mfu=mfu(flops_token, tps, world) if tps else None,
        )
        if eval_loss is not None:
            writer.add_scalar("eval/loss", eval_loss, metrics["steps"])
        writer.close()
        write_resolved(cfg, output)
        write_json(output / METRICS_FILE, metrics)
        print(
            f"done: {metrics['steps']} steps, eval loss {eval_loss}, attention "
            f"{metrics['attn_implementation']}, kernels {metrics['kernels']}, wrote {output}",
            flush=True,
        )
    dist.barrier()
    dist.destroy_process_group()


def main(argv=None) -> int:
    args = parse_args(argv)
    quiet_progress_off_terminal()
    try:
        run(args)
    except UserError as exc:
        message = str(exc)
        print(f"error: {message}", file=sys.stderr, flush=True)
        with suppress(OSError):
            Path(args.output, ERROR_FILE).write_text(message + "\n")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
