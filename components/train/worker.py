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
import sys
import time
from contextlib import nullcontext, suppress
from pathlib import Path

import torch
import torch.distributed as dist

from ..architectures import decoder_layers
from ..artifacts import (
    IGNORE_INDEX,
    METRICS_FILE,
    STATS_FILE,
    write_json,
)
from ..config import RunConfig, load_recipe, parse_recipe, write_resolved
from ..console import quiet_progress_off_terminal
from ..errors import UserError
from ..outputs import disk_errors
from ..planner.fit import resolved, total_steps
from ..planner.forecast import compare
from ..secrets import redact
from .attention import FLEX, attention_implementation
from .build import build_model, fit_run, unwrap, wrap
from .data import (
    COUNTS,
    BatchPlan,
    batch_loader,
    check_rows,
    collate,
    document_block_mask,
    pad_length,
)
from .entry import ERROR_FILE
from .flops import mfu, train_flops_per_token
from .measure import StepFlops, check_fits, start_profiler
from .metrics import (
    TrainMetrics,
    deepspeed_record,
    fsdp_record,
    peak_memory,
    precision_record,
    print_losses,
)
from .modeling import (
    checkpointed_layers,
)
from .parallel import (
    World,
    all_reduce_max,
    all_reduce_sum,
    init_world,
)
from .progress import LossLog, synchronize
from .state import resume, save_checkpoint, save_outputs
from .status import TrainerStatus

WARMUP_STEPS = 5  # steps left out of steady_tokens_per_second


def forward_loss(model, batch: dict, device, attn: str) -> torch.Tensor:
    inputs = {k: v.to(device, non_blocking=True) for k, v in batch.items() if k not in COUNTS}
    if attn == FLEX:  # packed rows: a sparse document mask, built on the device
        inputs["attention_mask"] = document_block_mask(inputs["position_ids"])
    return model(**inputs).loss


@torch.no_grad()
def evaluate(
    cfg: RunConfig, model, split, world: World, pad_id: int, attn: str, dtype
) -> float | None:
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
    assert isinstance(size, int), "resolved(cfg, fit) set the micro batch"
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


def dataset_stats(dataset: str) -> dict:
    stats_file = Path(dataset) / STATS_FILE
    return json.loads(stats_file.read_text()) if stats_file.is_file() else {}


def speed_prediction(cfg, fit, world: World, stats: dict, steps: int, kernels) -> dict | None:
    """The speed model's prediction for this run (forecast.run_prediction); a model it cannot
    predict costs one line, never the run."""
    from ..planner.forecast import run_prediction

    device = torch.cuda.get_device_name(world.device) if world.device.type == "cuda" else None
    try:
        predicted = run_prediction(cfg, fit, world.size, device, stats, steps, kernels)
    except Exception as exc:  # the prediction is a report; training goes on without it
        print(f"no speed prediction: {str(exc).splitlines()[0]}", flush=True)
        return None
    if predicted is not None:
        print(
            f"speed model: {predicted['tokens_per_second']:,.0f} tokens/s, "
            f"{predicted['step_seconds']:.3f} s a step on {world.size} x {predicted['gpu']}: "
            f"{predicted['train_seconds'] / 60:.1f} min for {steps} steps",
            flush=True,
        )
    return predicted


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
    built = build_model(cfg, world, attn, fit, packed)
    dtype, kernels = built.dtype, built.kernels
    plan = BatchPlan(
        len(train_split), cfg.train.micro_batch_size, world.rank, world.size, cfg.data.seed
    )
    check_rows(args.dataset, len(train_split), world.size, cfg.train.micro_batch_size)
    steps = total_steps(cfg, plan.per_epoch)
    check_fits(cfg, steps)
    model, optimizer, scheduler = wrap(cfg, built.model, world, dtype, built.ds_config, steps)
    is_ds = cfg.distributed.strategy == "deepspeed"
    start, losses = resume(cfg, output, world, model, optimizer, scheduler, steps)
    # the steps this run trains: a resumed run's prediction is for the rest
    predicted = (
        speed_prediction(cfg, fit, world, stats, steps - start, kernels) if world.main else None
    )

    writer = None
    if world.main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(output / "tensorboard"))
    accum, pad_id = cfg.train.grad_accum, tokenizer.pad_token_id
    # one row length for compiled layers (packed rows): static shapes, one compile
    pad_to = pad_length(attn, cfg.data.max_seq_len) or (
        cfg.data.max_seq_len if kernels.compile and packed else 0
    )
    flops_token = train_flops_per_token(
        unwrap(model), built.total, built.trainable, cfg.data.max_seq_len
    )
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
    warm_seconds: float | None = None
    warm_tokens = 0.0
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
    ran = start < steps
    metrics = TrainMetrics(
        steps=steps,
        resumed_from_step=start,
        loss=losses,
        tokens_per_second=log.tokens / train_seconds if ran else None,
        padded_tokens_per_second=padded * world.size / train_seconds if ran else None,
        examples_per_second=examples * world.size / train_seconds if ran else None,
        samples_per_second=rows_done / train_seconds if ran else None,
        steady_tokens_per_second=(
            (log.tokens - warm_tokens) / (train_seconds - warm_seconds)
            if warm_seconds is not None
            else None
        ),
        trainable_params=built.trainable,
        total_params=built.total,
        quantized_linear_modules=built.quantized,
        flop_counter=step_flops.report(flops_token),
        method=cfg.method,
        strategy=cfg.distributed.strategy,
        fsdp=fsdp_record(cfg, model),
        deepspeed=deepspeed_record(model),
        world_size=world.size,
        device=str(world.device.type),
        attn_implementation=attn,
        kernels=kernels.as_dict(),
        gradient_checkpointing={
            **fit.checkpointing_record(),
            "layers": checkpointed_layers(decoder_layers(unwrap(model))),
        },
        micro_batch=fit.micro_record(world.size),
        precision=precision_record(unwrap(model)),
        train_seconds=round(train_seconds, 3),
        dataset_fingerprint=fingerprint,
        prediction=compare(
            predicted,
            padded * world.size / train_seconds if ran else None,
            round(train_seconds, 3),
        ),
    )
    evaluation = (eval_split, attn, dtype)
    finish(cfg, model, tokenizer, world, output, evaluation, writer, metrics, flops_token)
    dist.barrier()
    dist.destroy_process_group()
    KEPT.append(model)  # its process group is never destructed in-process: see end_process


# The wrapped model holds the process group (DDP's Reducer, FSDP's mesh) after
# destroy_process_group. Letting it go destructs a gloo group on the main thread with the GIL
# held; that joins gloo's work threads, and one of them may at that instant be freeing the last
# work of the final collective, whose tensors need the GIL: both wait forever (seen in CI: rank 1
# hung in ~ProcessGroupGloo after it wrote its outputs). So the model is kept until the process
# ends without destructors: end_process here, multiprocessing's os._exit for a forked worker.
KEPT: list = []


def end_process(code: int):
    """Exit with `code` after flushing, without running destructors (see KEPT)."""
    import logging

    for stream in (sys.stdout, sys.stderr):
        with suppress(Exception):
            stream.flush()
    logging.shutdown()
    os._exit(code)


def finish(
    cfg: RunConfig,
    model,
    tokenizer,
    world: World,
    output: Path,
    evaluation: tuple,
    writer,
    metrics: TrainMetrics,
    flops_per_token: float,
) -> None:
    """Final eval, the adapter or weights, then metrics.json (last: it marks a finished run)."""
    eval_split, attn, dtype = evaluation
    eval_loss = evaluate(cfg, model, eval_split, world, tokenizer.pad_token_id, attn, dtype)
    save_outputs(cfg, model, tokenizer, output, world, metrics.dataset_fingerprint)
    peak = all_reduce_max(peak_memory(world), world)
    if world.main:
        tps = metrics.tokens_per_second
        metrics.eval_loss = eval_loss
        metrics.peak_memory_bytes = int(peak)
        metrics.mfu = mfu(flops_per_token, tps, world) if tps else None
        if eval_loss is not None:
            writer.add_scalar("eval/loss", eval_loss, metrics.steps)
        writer.close()
        write_resolved(cfg, output)
        write_json(output / METRICS_FILE, metrics.as_dict())
        print(
            f"done: {metrics.steps} steps, eval loss {eval_loss}, attention "
            f"{metrics.attn_implementation}, kernels {metrics.kernels}, wrote {output}",
            flush=True,
        )


def name_process(rank: str | None) -> None:
    """Show the process as kubetune-rankN in ps, top and pgrep (Linux's PR_SET_NAME: the main
    thread's 15-byte name): with workers forked from a fork server, every rank's command line
    is the fork server's, and the name is what tells them apart."""
    if rank is None or not sys.platform.startswith("linux"):
        return
    import ctypes

    with suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(15, f"kubetune-rank{rank}".encode()[:15], 0, 0, 0)


def keep_error(output: Path, message: str) -> None:
    """Leave the user error in ERROR_FILE for the launcher, whole or not at all: the first rank
    to fail writes it under a name of its own and links it into place (the link either appears
    complete or not), so a rank that the launcher terminates while another rank's error is being
    written cannot leave the file truncated to nothing."""
    mine = output / f"{ERROR_FILE}.{os.getpid()}"
    with suppress(OSError):
        try:
            mine.write_text(message + "\n")
            os.link(mine, output / ERROR_FILE)  # FileExistsError: another rank's error is kept
        finally:
            mine.unlink(missing_ok=True)


def main(argv=None) -> int:
    name_process(os.environ.get("RANK"))
    args = parse_args(argv)
    quiet_progress_off_terminal()
    try:
        with disk_errors(args.output):  # a full disk or a read-only output: one line
            run(args)
    except UserError as exc:
        message = redact(str(exc))
        print(f"error: {message}", file=sys.stderr, flush=True)
        keep_error(Path(args.output), message)
        return 2
    return 0


if __name__ == "__main__":
    end_process(main())
