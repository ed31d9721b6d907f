"""The training loop (`Loop`) and the evaluation loop (`evaluate`): every batch, loss and
logged metric comes from the run's objective (components/objectives/), so neither loop knows
which one runs; and metrics.json's record of the run (`run_metrics`)."""

from __future__ import annotations

import time
from contextlib import nullcontext

import torch

from ..architectures import decoder_layers
from ..config import RunConfig
from ..objectives import objective_of, row_tokens
from ..objectives.preference import reference_mode
from ..planner.forecast import compare
from .build import unwrap
from .data import (
    batch_loader,
    pad_length,
    rank_batches,
)
from .measure import StepFlops, start_profiler
from .metrics import (
    TrainMetrics,
    deepspeed_record,
    fsdp_record,
    precision_record,
    print_losses,
)
from .modeling import (
    checkpointed_layers,
)
from .moe import expert_tokens
from .parallel import (
    World,
    all_reduce_sum,
)
from .progress import LossLog, synchronize
from .session import Session
from .state import save_checkpoint
from .status import TrainerStatus

WARMUP_STEPS = 5  # steps left out of steady_tokens_per_second


@torch.no_grad()
def evaluate(
    cfg: RunConfig,
    model,
    split,
    world: World,
    pad_id: int,
    attn: str,
    dtype,
    objective=None,
    reference=None,
) -> tuple[float | None, dict[str, float]]:
    """The objective's mean eval loss (weighted as the objective says: tokens for sft, pairs
    for the preference objectives) and its metrics' means (weighted the same), the split
    sharded across ranks.

    Every rank runs the same number of forwards (FSDP and ZeRO-3 forwards are collectives); a
    rank whose share has run out repeats a row and discards the result."""
    if split is None or len(split) == 0:
        return None, {}
    objective = objective or objective_of(cfg)
    model.eval()
    pad_to = pad_length(attn, row_tokens(cfg))
    loss_sum = weight = 0.0
    sums: dict[str, float] = {}
    size = cfg.train.micro_batch_size
    assert isinstance(size, int), "resolved(cfg, fit) set the micro batch"
    for chunk, rows in rank_batches(split, "eval", world.rank, world.size, size):
        batch = objective.collate(rows, pad_id, attn, dtype, pad_to)
        out = objective.loss(model, batch, world.device, attn, reference)
        if chunk:
            n = objective.weight(batch)
            loss_sum += float(out.value) * n
            weight += n
            for name, value in out.metrics.items():
                sums[name] = sums.get(name, 0.0) + float(value) * n
    model.train()
    total = all_reduce_sum(weight, world)
    means = {name: all_reduce_sum(sums.get(name, 0.0), world) / total for name in sorted(sums)}
    return (all_reduce_sum(loss_sum, world) / total if total else None), (means if total else {})


class Loop:
    """The training loop over a session's steps: accumulation, clipping, the optimizer and
    schedule, losses logged without a host sync per micro batch, evaluation and checkpoints
    every so many steps. `train()` trains; then the counters say what it did."""

    def __init__(self, run: Session):
        self.run = run
        cfg, world, kernels = run.cfg, run.world, run.built.kernels
        self.accum, self.pad_id = cfg.train.grad_accum, run.tokenizer.pad_token_id
        self.is_ds = cfg.distributed.strategy == "deepspeed"
        self.ddp_accum = not self.is_ds and world.size > 1 and cfg.distributed.strategy == "ddp"
        self.trainable = [p for p in run.model.parameters() if p.requires_grad]
        metrics = run.objective.metrics_for(run.model)
        self.log = LossLog(world, run.losses, run.writer, metrics)
        self.status = TrainerStatus.from_env(world.rank)
        self.rows_done, self.paused, self.padded, self.examples = 0.0, 0.0, 0, 0
        self.began = 0.0
        # Steady speed leaves out the first steps (flex_attention/Triton compiles, autotuning,
        # the allocator's growth): the figure a long run settles at.
        steady = run.steps - run.start >= 2 * WARMUP_STEPS
        self.warm_step = run.start + WARMUP_STEPS if steady else None
        self.warm_seconds: float | None = None
        self.warm_tokens = 0.0
        self.eval_history: list[dict] = []  # every evaluation during training
        self.step_flops = StepFlops(cfg, world, synchronize)
        # one row length for compiled layers (packed rows): static shapes, one compile
        self.pad_to = pad_length(run.attn, row_tokens(cfg)) or (
            row_tokens(cfg) if kernels.compile and run.packed else 0
        )

    def batches(self):
        run = self.run
        return iter(
            batch_loader(
                run.train_split, run.plan, run.start * self.accum, run.steps * self.accum,
                self.pad_id, run.attn, run.built.dtype, pin=run.world.device.type == "cuda",
                pad_to=self.pad_to, objective=run.objective,
            )
        )  # fmt: skip

    def flush(self, wait: bool = True) -> None:
        """Record the losses that landed (all of them with `wait`); rank 0 prints their lines."""
        run = self.run
        landed = self.log.flush(wait)
        if run.world.main:
            elapsed = time.perf_counter() - self.began - self.paused
            logging_steps = run.cfg.train.logging_steps
            print_losses(
                landed, logging_steps, run.steps, run.start, self.log, elapsed, self.status
            )

    def step(self, batches, done: int) -> None:
        """One optimizer step of `accum` micro batches."""
        run, accum = self.run, self.accum
        model, world = run.model, run.world
        step_loss, step_tokens = None, 0
        step_metrics: dict[str, torch.Tensor] = {}
        with self.step_flops.around(done):
            for micro in range(accum):
                batch = next(batches)
                no_sync = self.ddp_accum and micro < accum - 1
                with model.no_sync() if no_sync else nullcontext():
                    out = run.objective.loss(model, batch, world.device, run.attn, run.reference)
                    if self.is_ds:
                        model.backward(out.value)
                        model.step()
                    else:
                        (out.value / accum).backward()
                part = out.value.detach() / accum
                step_loss = part if step_loss is None else step_loss + part
                for name, value in out.metrics.items():
                    step_metrics[name] = step_metrics.get(name, 0) + value.detach() / accum
                step_tokens += batch["tokens"]
                self.padded += batch["padded_tokens"]
                self.examples += batch["examples"]
            if not self.is_ds:
                torch.nn.utils.clip_grad_norm_(self.trainable, run.cfg.train.max_grad_norm)
                run.optimizer.step()
                run.scheduler.step()
                run.optimizer.zero_grad(set_to_none=True)
        self.step_flops.tokens_of(done, step_tokens)
        self.rows_done += world.size * accum * run.plan.micro
        lr = run.scheduler.get_last_lr()[0]
        self.log.add(done, step_loss, lr, step_tokens, step_metrics)

    def after_step(self, done: int) -> None:
        """Log, measure the warm-up, evaluate and checkpoint as the recipe says."""
        run, train = self.run, self.run.cfg.train
        evaluating = bool(train.eval_steps and done % train.eval_steps == 0)
        saving = done % train.save_steps == 0
        logging = done % train.logging_steps == 0 or done == run.steps
        pausing = done < run.steps and (evaluating or saving)
        if logging or pausing:
            # on a GPU the losses land a logging step later: no host sync in the loop
            self.flush(wait=pausing or done == run.steps)
        if done == self.warm_step:
            self.flush()
            synchronize(run.world)
            self.warm_seconds = time.perf_counter() - self.began - self.paused
            self.warm_tokens = self.log.tokens
        if not pausing:
            return
        synchronize(run.world)
        pause = time.perf_counter()
        if evaluating:
            eval_loss, eval_metrics = evaluate(
                run.cfg, run.model, run.eval_split, run.world, self.pad_id, run.attn,
                run.built.dtype, run.objective, run.reference,
            )  # fmt: skip
            if run.writer is not None and eval_loss is not None:
                run.writer.add_scalar("eval/loss", eval_loss, done)
                for name, value in eval_metrics.items():
                    run.writer.add_scalar(f"eval/{name}", value, done)
            if run.world.main and eval_metrics:
                line = ", ".join(f"{k} {v:.4f}" for k, v in eval_metrics.items())
                print(f"step {done}: eval loss {eval_loss:.4f}, {line}", flush=True)
            self.eval_history.append({"step": done, "loss": eval_loss, **eval_metrics})
        if saving:
            save_checkpoint(
                run.cfg, run.output, done, run.world, run.model, run.optimizer, run.losses,
                run.steps,
            )  # fmt: skip
        self.paused += time.perf_counter() - pause

    def train(self) -> float:
        """Train every remaining step; the seconds it took, pauses left out."""
        run = self.run
        batches = self.batches()
        profiler = start_profiler(run.cfg, run.world, run.output, run.steps - run.start)
        run.model.train()
        self.began = time.perf_counter()
        for step in range(run.start, run.steps):
            self.step(batches, step + 1)
            if profiler is not None:
                profiler.step()
            self.after_step(step + 1)
        self.flush()
        synchronize(run.world)
        seconds = time.perf_counter() - self.began - self.paused
        if profiler is not None:
            profiler.stop()
        return seconds


def run_metrics(run: Session, loop: Loop, seconds: float, flops_token: float) -> TrainMetrics:
    """metrics.json's record of a trained run (finish adds the final evaluation and memory)."""
    world, built, model = run.world, run.built, run.model
    ran = run.start < run.steps

    def per_second(count: float) -> float | None:
        return count / seconds if ran else None

    steady = None
    if loop.warm_seconds is not None:
        steady = (loop.log.tokens - loop.warm_tokens) / (seconds - loop.warm_seconds)
    return TrainMetrics(
        steps=run.steps,
        resumed_from_step=run.start,
        loss=run.losses,
        tokens_per_second=per_second(loop.log.tokens),
        padded_tokens_per_second=per_second(loop.padded * world.size),
        examples_per_second=per_second(loop.examples * world.size),
        samples_per_second=per_second(loop.rows_done),
        steady_tokens_per_second=steady,
        trainable_params=built.trainable,
        total_params=built.total,
        quantized_linear_modules=built.quantized,
        flop_counter=loop.step_flops.report(flops_token),
        method=run.cfg.method,
        strategy=run.cfg.distributed.strategy,
        fsdp=fsdp_record(run.cfg, model),
        deepspeed=deepspeed_record(model),
        world_size=world.size,
        device=str(world.device.type),
        attn_implementation=run.attn,
        kernels=built.kernels.as_dict(),
        gradient_checkpointing={
            **run.fit.checkpointing_record(),
            "layers": checkpointed_layers(decoder_layers(unwrap(model))),
        },
        micro_batch=run.fit.micro_record(world.size),
        precision=precision_record(unwrap(model)),
        train_seconds=round(seconds, 3),
        dataset_fingerprint=run.stats.get("fingerprint"),
        prediction=compare(run.predicted, per_second(loop.padded * world.size), round(seconds, 3)),
        objective_metrics=loop.log.metrics or None,
        eval_history=loop.eval_history or None,
        objective=run.objective.name,
        reference=reference_mode(run.cfg),
        expert_tokens=expert_tokens(model, world),
    )
