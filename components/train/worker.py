"""The training worker: one process per GPU (or per CPU slot), started by torchrun.

    torchrun ... -m kubetune.components.train.worker --recipe R --dataset D --output O

It reads as one story: join the process group → load the base model (quantized for qlora) →
add LoRA → shard (ddp / fsdp / deepspeed) → resume from the newest complete checkpoint →
train (accumulation, clipping, warmup + schedule) → checkpoint every train.save_steps →
evaluate → save the adapter or full weights, the tokenizer, the recipe and metrics.json.
Everything comes from the recipe, these arguments and the environment that torchrun or the
Training Operator sets, so a PyTorchJob pod runs exactly this command. The setup before the
loop is session.py, the loop itself loop.py.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from contextlib import suppress
from pathlib import Path

import torch.distributed as dist

from ..artifacts import (
    METRICS_FILE,
    write_json,
)
from ..config import RunConfig, write_resolved
from ..console import quiet_progress_off_terminal
from ..errors import UserError
from ..outputs import disk_errors
from ..secrets import redact
from .build import unwrap
from .entry import ERROR_FILE, PREEMPTED_EXIT, PREEMPTED_FILE
from .flops import mfu, train_flops_per_token
from .guard import Preempted
from .loop import Loop, evaluate, run_metrics
from .metrics import (
    TrainMetrics,
    peak_memory,
)
from .parallel import (
    World,
    all_reduce_max,
)
from .session import start_session
from .state import save_outputs
from .watchdog import Watchdog, abort_others, end_with


def parse_args(argv):
    parser = argparse.ArgumentParser(description="kubetune training worker (run by torchrun)")
    parser.add_argument("--recipe", required=True)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    return parser.parse_args(argv)


def run(args) -> None:
    """join the process group, build, resume, train, evaluate, save (see the module docstring)."""
    session = start_session(args)
    cfg, model, built = session.cfg, session.model, session.built
    session.watchdog = Watchdog(
        session.world, cfg.distributed.timeout_minutes, end_with(session.output, keep_error)
    )
    session.watchdog.start()
    flops_token = train_flops_per_token(
        unwrap(model), built.total, built.trainable, cfg.data.max_seq_len
    )
    loop = Loop(session)
    session.watchdog.signalled = lambda: loop.guard.signal is not None
    try:
        seconds = loop.train()
    except RuntimeError as exc:  # gloo's (and NCCL's blocking) timeout: name who did not arrive
        if not re.search(r"timed out|timeout", str(exc), re.IGNORECASE):
            raise
        watchdog = session.watchdog
        raise UserError(watchdog.diagnose(time.monotonic() - watchdog.since)) from None
    session.watchdog.mark(session.steps, "the final evaluation and save")
    metrics = run_metrics(session, loop, seconds, flops_token)
    evaluation = (
        session.eval_split,
        session.attn,
        built.dtype,
        session.objective,
        session.reference,
    )
    finish(
        cfg, model, session.tokenizer, session.world, session.output, evaluation, session.writer,
        metrics, flops_token,
    )  # fmt: skip
    dist.barrier()
    session.watchdog.stop()
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
    eval_split, attn, dtype, objective, reference = evaluation
    eval_loss, eval_metrics = evaluate(
        cfg, model, eval_split, world, tokenizer.pad_token_id, attn, dtype, objective, reference
    )
    save_outputs(cfg, model, tokenizer, output, world, metrics.dataset_fingerprint)
    peak = all_reduce_max(peak_memory(world), world)
    if world.main:
        tps = metrics.tokens_per_second
        metrics.eval_loss = eval_loss
        metrics.eval_metrics = eval_metrics or None
        metrics.peak_memory_bytes = int(peak)
        metrics.mfu = mfu(flops_per_token, tps, world) if tps else None
        if eval_loss is not None:
            writer.add_scalar("eval/loss", eval_loss, metrics.steps)
        for name, value in eval_metrics.items():
            writer.add_scalar(f"eval/{name}", value, metrics.steps)
        writer.close()
        write_resolved(cfg, output)
        write_json(output / METRICS_FILE, metrics.as_dict())
        measured = "".join(f", eval {k} {v:.4f}" for k, v in eval_metrics.items())
        print(
            f"done: {metrics.steps} steps, eval loss {eval_loss}{measured}, attention "
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
    except Preempted as stop:
        return preempted(Path(args.output), stop)
    except UserError as exc:
        message = redact(str(exc))
        print(f"error: {message}", file=sys.stderr, flush=True)
        keep_error(Path(args.output), message)
        abort_others(message)  # ranks waiting in a collective for this one stop too
        return 2
    return 0


def preempted(output: Path, stop: Preempted) -> int:
    """After a SIGTERM's checkpoint: rank 0 says so (and leaves the line for the launcher);
    every rank exits with PREEMPTED_EXIT, which a launcher reports as preempted, not failed."""
    line = (
        f"preempted (SIGTERM) at step {stop.step} of {stop.steps}: the checkpoint "
        f"{stop.checkpoint} is saved, and a rerun resumes from it"
    )
    if os.environ.get("RANK", "0") == "0":
        print(line, flush=True)
        with suppress(OSError):
            (output / PREEMPTED_FILE).write_text(line + "\n")
    return PREEMPTED_EXIT


if __name__ == "__main__":
    end_process(main())
