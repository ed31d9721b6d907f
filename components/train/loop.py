"""The training loop (`Loop`) and the evaluation loop (`evaluate`): every batch, loss and
logged metric comes from the run's objective (components/objectives/), so neither loop knows
which one runs; and metrics.json's record of the run (`run_metrics`)."""

from __future__ import annotations

import shutil
import time
import warnings
from contextlib import nullcontext

import torch

from ..architectures import decoder_layers
from ..config import RunConfig
from ..errors import UserError
from ..objectives import objective_of, row_tokens
from ..objectives.preference import reference_mode
from ..planner.forecast import compare
from .build import unwrap
from .checkpoint import complete_checkpoints, read_step
from .data import (
    BatchPlan,
    batch_loader,
    pad_length,
    rank_batches,
)
from .guard import SPIKE, Guard, Preempted
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
from .oom import is_oom, oom_line
from .parallel import (
    World,
    all_reduce_sum,
)
from .progress import LossLog, synchronize
from .session import Session
from .state import resume, save_checkpoint
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


def step_schedule(scheduler) -> None:
    """The schedule follows the data position, skipped steps included (torch warns when a
    schedule steps before its optimizer ever has: a skipped first step does that on purpose)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
        scheduler.step()


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
        self.guard = Guard(cfg, world, run.skipped, run.output)
        self.rollback: int | None = None  # a spike's step to go back before (spike_guard)
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

    def mark(self, step: int, doing: str) -> None:
        """Progress for the watchdog (watchdog.py)."""
        if self.run.watchdog is not None:
            self.run.watchdog.mark(step, doing)

    def flush(self, wait: bool = True) -> None:
        """Record the losses that landed (all of them with `wait`); rank 0 prints their lines.
        A spike among them (train.spike_guard) is logged, and with rollback remembered."""
        run = self.run
        landed = self.log.flush(wait)
        guard = run.cfg.train.spike_guard
        for step, loss, _ in landed:
            if self.guard.spike(step, loss) and guard is not None and guard.action == "rollback":
                self.rollback = step if self.rollback is None else min(self.rollback, step)
        if run.world.main:
            elapsed = time.perf_counter() - self.began - self.paused
            logging_steps = run.cfg.train.logging_steps
            print_losses(
                landed, logging_steps, run.steps, run.start, self.log, elapsed, self.status
            )

    def rows_of(self, done: int):
        """rank -> the rows of the train split that its micro batches of step `done` held."""
        run = self.run
        first = (done - 1) * self.accum

        def rows(rank: int) -> list[int]:
            plan = BatchPlan(run.plan.n_rows, run.plan.micro, rank, run.world.size, run.plan.seed)
            return [int(r) for k in range(first, first + self.accum) for r in plan.rows(k)]

        return rows

    def skip_batches(self, batches, done: int) -> None:
        """A step a spike rollback skips: its batches are drawn, nothing is trained."""
        for _ in range(self.accum):
            next(batches)
        step_schedule(self.run.scheduler)
        nan = torch.tensor(float("nan"))
        metrics = {name: nan for name in self.log.metrics}
        self.log.add(done, nan, self.run.scheduler.get_last_lr()[0], 0, metrics)

    def step(self, batches, done: int) -> None:
        """One optimizer step of `accum` micro batches (an out-of-memory error: one line)."""
        try:
            self._step(batches, done)
        except Exception as exc:
            if not is_oom(exc):
                raise
            run = self.run
            rows = run.plan.n_rows // run.world.size
            raise UserError(oom_line(run.cfg, run.fit, run.world, done, exc, rows)) from None

    def _step(self, batches, done: int) -> None:
        run, accum = self.run, self.accum
        model, world = run.model, run.world
        if [done, SPIKE] in self.guard.skipped:
            self.skip_batches(batches, done)
            return
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
            if self.is_ds:
                norm = model.get_global_grad_norm()
            else:
                norm = torch.nn.utils.clip_grad_norm_(self.trainable, run.cfg.train.max_grad_norm)
            verdict = self.guard.agree(step_loss, norm)  # every rank takes the same branch
            if verdict.bad:
                self.guard.nonfinite(done, verdict, self.rows_of(done))  # skip, or the line
            if not self.is_ds:
                if not verdict.bad:
                    run.optimizer.step()
                step_schedule(run.scheduler)
                run.optimizer.zero_grad(set_to_none=True)
        self.step_flops.tokens_of(done, step_tokens)
        self.rows_done += world.size * accum * run.plan.micro
        lr = run.scheduler.get_last_lr()[0]
        self.log.add(done, step_loss, lr, step_tokens, step_metrics)

    def after_step(self, done: int) -> None:
        """Log, measure the warm-up, evaluate and checkpoint as the recipe says."""
        run, train = self.run, self.run.cfg.train
        preempting = self.guard.preempting and done < run.steps  # SIGTERM: save, then stop
        evaluating = bool(train.eval_steps and done % train.eval_steps == 0) and not preempting
        saving = done % train.save_steps == 0 or preempting
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
        if not pausing or self.rollback is not None:  # a spike to roll back: no save of it
            return
        synchronize(run.world)
        pause = time.perf_counter()
        if evaluating:
            self.mark(done, "the evaluation")
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
            self.mark(done, "the checkpoint")
            folder = save_checkpoint(
                run.cfg, run.output, done, run.world, run.model, run.optimizer, run.losses,
                run.steps, self.guard.skipped,
            )  # fmt: skip
            if preempting:
                raise Preempted(done, run.steps, str(folder))
        self.paused += time.perf_counter() - pause

    def train(self) -> float:
        """Train every remaining step; the seconds it took, pauses left out."""
        run = self.run
        batches = self.batches()
        profiler = start_profiler(run.cfg, run.world, run.output, run.steps - run.start)
        run.model.train()
        self.began = time.perf_counter()
        done = run.start
        while done < run.steps:
            self.mark(done + 1, "training")
            self.step(batches, done + 1)
            done += 1
            if profiler is not None:
                profiler.step()
            self.after_step(done)
            if self.rollback is not None:
                done, batches = self.roll_back(done, batches)
        self.flush()
        synchronize(run.world)
        seconds = time.perf_counter() - self.began - self.paused
        if profiler is not None:
            profiler.stop()
        return seconds

    def roll_back(self, done: int, batches):
        """Go back to the newest checkpoint before the spike and skip the spike's batch (the
        step and the data iterator to go on with)."""
        run, spike, guard = self.run, self.rollback, self.guard
        assert spike is not None, "called with a spike to roll back"
        self.rollback = None
        self.log.flush()  # what is still in flight is replaced by the checkpoint's record
        limit = run.cfg.train.max_skipped_steps
        if len(guard.skipped) >= limit:
            raise UserError(
                f"step {spike}: a loss spike, and train.max_skipped_steps={limit} steps were "
                "skipped already; the last good checkpoint is kept"
            )
        self.mark(done, "a rollback")
        start, losses, state = resume(
            run.cfg, run.output, run.world, run.model, run.optimizer, run.scheduler, run.steps,
            before=spike,
        )  # fmt: skip
        if not state:
            if run.world.main:
                print(f"step {spike}: no checkpoint before it to roll back to", flush=True)
            return done, batches
        if run.world.main:  # the checkpoints after it hold the spike's update
            for later in complete_checkpoints(run.output):
                if read_step(later) > start:
                    shutil.rmtree(later, ignore_errors=True)
        run.losses[:] = losses
        for series in self.log.metrics.values():
            series[:] = [point for point in series if point[0] <= start]
        guard.skipped[:] = [*state.get("skipped", []), [spike, SPIKE]]
        guard.recent.clear()
        if run.world.main:
            print(f"step {spike}: rolled back to step {start}; its batch is skipped", flush=True)
        run.start = start
        return start, self.batches()


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
