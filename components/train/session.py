"""A training run set up for its loop (`start_session`): the resolved recipe, the prepared
data and tokenizer, the fitted micro batch, the built model sharded with its optimizer and
schedule, where it resumes from, and the speed model's prediction."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..artifacts import (
    STATS_FILE,
)
from ..config import RunConfig, load_recipe, parse_recipe
from ..errors import UserError
from ..objectives import Objective, objective_of
from ..planner.fit import Fit, resolved, total_steps
from .attention import attention_implementation
from .build import BuiltModel, build_model, fit_run, wrap
from .data import (
    BatchPlan,
    check_rows,
)
from .measure import check_fits
from .parallel import (
    World,
    init_world,
)
from .state import resume


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


@dataclass
class Session:
    """A run set up for its loop: the resolved recipe, the data, the wrapped model with its
    optimizer and schedule, where it resumes from, and what it predicted."""

    cfg: RunConfig
    output: Path
    world: World
    objective: Objective
    train_split: Any
    eval_split: Any
    stats: dict
    tokenizer: Any
    attn: str
    packed: bool
    fit: Fit
    built: BuiltModel
    plan: BatchPlan
    steps: int
    model: Any = None
    optimizer: Any = None
    scheduler: Any = None
    start: int = 0
    losses: list = field(default_factory=list)
    predicted: dict | None = None
    writer: Any = None
    reference: Any = None  # a preference objective's live reference (train/reference.py)
    skipped: list = field(default_factory=list)  # [[step, why]]: steps not trained (guard.py)
    watchdog: Any = None  # watchdog.py: names the rank that stops answering


def load_session(args) -> Session:
    """The recipe, the data and the tokenizer, the fitted micro batch, the built model, and the
    number of steps: everything before the model is sharded."""
    cfg = recipe_from_arg(args.recipe, args.overrides)
    output, world = Path(args.output), init_world(cfg.distributed.timeout_minutes)
    torch.manual_seed(cfg.train.seed)
    from datasets import load_from_disk

    from ..models import load_tokenizer

    data = load_from_disk(args.dataset)
    train_split = data["train"]
    stats = dataset_stats(args.dataset)
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
    micro = cfg.train.micro_batch_size
    assert isinstance(micro, int), "resolved(cfg, fit) set the micro batch"
    plan = BatchPlan(len(train_split), micro, world.rank, world.size, cfg.data.seed)
    check_rows(args.dataset, len(train_split), world.size, micro)
    steps = total_steps(cfg, plan.per_epoch)
    check_fits(cfg, steps)
    return Session(
        cfg, output, world, objective_of(cfg), train_split, data.get("eval", None), stats,
        tokenizer, attn, packed, fit, built, plan, steps,
    )  # fmt: skip


def start_session(args) -> Session:
    """The session sharded and wrapped, resumed from its newest checkpoint, with its speed
    prediction and (rank 0) its TensorBoard writer."""
    run = load_session(args)
    cfg, world, built = run.cfg, run.world, run.built
    run.model, run.optimizer, run.scheduler = wrap(
        cfg, built.model, world, built.dtype, built.ds_config, run.steps
    )
    from .reference import set_up

    run.reference = set_up(run)  # before resume: a precomputed reference is the base's
    run.start, run.losses, state = resume(
        cfg, run.output, world, run.model, run.optimizer, run.scheduler, run.steps
    )
    run.skipped = state.get("skipped", [])
    if world.main:  # the steps this run trains: a resumed run's prediction is for the rest
        rest = run.steps - run.start
        run.predicted = speed_prediction(cfg, run.fit, world, run.stats, rest, built.kernels)
        from torch.utils.tensorboard import SummaryWriter

        run.writer = SummaryWriter(str(run.output / "tensorboard"))
    return run
