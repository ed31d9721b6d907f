"""What every rank agrees on after each step's backward, before the optimizer steps: whether any
rank saw a non-finite loss or gradient norm, and whether any rank was told to stop (SIGTERM: a
drained or preempted node). One all-reduce of a (ranks x 3) table per step, read on the host
(one sync per optimizer step, none per micro batch), so every rank takes the same branch:

- a NaN/inf on any rank: `train.nonfinite: stop` ends every rank with one line naming the step,
  the rank, the values, the likely causes and the rows of the prepared train split that the
  rank's batch held; `skip` drops the optimizer step (the data moves on), up to
  `train.max_skipped_steps`, then stops the same way. Weights are never updated from it, and
  the last good checkpoint is kept.
- SIGTERM on any rank: every rank finishes the step, saves a checkpoint and exits with
  PREEMPTED_EXIT (Preempted); a second SIGTERM changes nothing.
- loss spikes (`train.spike_guard`): judged on the losses as they land (a mean over ranks, the
  same on every rank), logged, and with `action: rollback` answered by going back to the newest
  checkpoint before the spike and skipping that step's batch (loop.py).
"""

from __future__ import annotations

import math
import signal
import statistics
from dataclasses import dataclass, field

import torch

from ..errors import UserError
from .parallel import every_rank

SPIKE = "loss spike"  # why a spike guard's rollback skipped a step (trainer_state `skipped`)


class Preempted(Exception):
    """Every rank saved the checkpoint of `step` after a SIGTERM; the worker exits as
    preempted."""

    def __init__(self, step: int, steps: int, checkpoint: str):
        super().__init__(f"step {step}")
        self.step, self.steps, self.checkpoint = step, steps, checkpoint


@dataclass
class Verdict:
    bad: list[tuple[int, float, float]] = field(default_factory=list)  # (rank, loss, norm)
    preempt: bool = False


def local_norm(norm) -> torch.Tensor | None:
    """clip_grad_norm_'s total norm as a plain tensor (FSDP2 returns a DTensor)."""
    if norm is None:
        return None
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return norm if isinstance(norm, torch.Tensor) else torch.tensor(float(norm))


class Guard:
    """The run's agreed view of bad numbers and stop signals (see the module docstring)."""

    def __init__(self, cfg, world, skipped: list, output=None, install: bool = True):
        self.cfg, self.world, self.output = cfg, world, output
        self.skipped = skipped  # [[step, why]]: carried in every checkpoint's trainer_state
        self.signal: str | None = None
        self.preempting = False
        if install:
            signal.signal(signal.SIGTERM, self._on_signal)
        spike = cfg.train.spike_guard
        self.spike_window = spike.window if spike is not None else 0
        self.recent: list[float] = []

    def _on_signal(self, signum, _frame) -> None:
        name = signal.Signals(signum).name
        if self.signal is None:
            print(
                f"rank {self.world.rank}: {name}: finishing this step, then saving a checkpoint",
                flush=True,
            )
        self.signal = name  # a second one changes nothing: the save is already coming

    def agree(self, loss: torch.Tensor | None, norm) -> Verdict:
        """Every rank's loss, gradient norm and stop request, all-reduced (a collective)."""
        norm = local_norm(norm)
        row = [
            0.0 if loss is None else loss.detach(),
            0.0 if norm is None else norm.detach(),
            1.0 if self.signal else 0.0,
        ]
        rows = every_rank(row, self.world)
        verdict = Verdict(preempt=any(r[2] > 0 for r in rows))
        verdict.bad = [
            (rank, r[0], r[1])
            for rank, r in enumerate(rows)
            if not (math.isfinite(r[0]) and math.isfinite(r[1]))
        ]
        self.preempting = self.preempting or verdict.preempt
        return verdict

    def nonfinite(self, step: int, verdict: Verdict, rows_of) -> None:
        """After a step with a NaN/inf: return to skip it (recorded), or raise the one line.
        `rows_of(rank)`: the train split's rows that rank's step held."""
        train = self.cfg.train
        rank, loss, norm = verdict.bad[0]
        if train.nonfinite == "skip" and len(self.skipped) < train.max_skipped_steps:
            self.skipped.append([step, f"non-finite: rank {rank} loss {loss} grad norm {norm}"])
            if self.world.main:
                print(
                    f"step {step}: skipped (rank {rank}: loss {loss:g}, gradient norm {norm:g}; "
                    f"{len(self.skipped)} of train.max_skipped_steps={train.max_skipped_steps} "
                    f"skipped so far; rows {fmt_rows(rows_of(rank))})",
                    flush=True,
                )
            return
        raise UserError(self.stop_line(step, verdict, rows_of))

    def stop_line(self, step: int, verdict: Verdict, rows_of) -> str:
        train = self.cfg.train
        rank, loss, norm = verdict.bad[0]
        which = "the loss" if not math.isfinite(loss) else "the gradient norm"
        value = loss if not math.isfinite(loss) else norm
        others = [r for r, _, _ in verdict.bad[1:]]
        also = (
            f" (also rank{'s' if len(others) > 1 else ''} {', '.join(map(str, others))})"
            if others
            else ""
        )
        if train.nonfinite == "skip":
            lead = (
                f"step {step}: {which} is {value:g} on rank {rank}{also}, and "
                f"train.max_skipped_steps={train.max_skipped_steps} steps were skipped already "
                f"(steps {', '.join(str(s) for s, _ in self.skipped[-5:])})"
            )
        else:
            lead = f"step {step}: {which} is {value:g} on rank {rank}{also} (train.nonfinite=stop)"
        dtype = self.cfg.model.dtype
        causes = [
            f"the learning rate (train.lr={train.lr:g}) is too high for this model",
            "fp16 overflow (model.dtype=float16: use bfloat16)"
            if dtype == "float16"
            else f"fp16 overflow is not it (model.dtype={dtype})",
            f"a bad batch: rows {fmt_rows(rows_of(rank))} of the prepared train split on rank "
            f"{rank}",
        ]
        from .checkpoint import latest_checkpoint

        last = latest_checkpoint(self.output) if self.output is not None else None
        kept = f"the last good checkpoint {last.name} is kept" if last else "no checkpoint yet"
        return (
            f"{lead}; weights were not updated from it, and {kept}. "
            f"Likely causes: {'; '.join(causes)}"
        )

    def spike(self, step: int, loss: float) -> bool:
        """Whether a landed loss is a spike (train.spike_guard); logs it on rank 0."""
        if not self.spike_window or not math.isfinite(loss):
            return False
        guard, history = self.cfg.train.spike_guard, self.recent
        spiked = False
        if len(history) >= self.spike_window:
            mean, spread = statistics.fmean(history), statistics.pstdev(history)
            score = (loss - mean) / spread if spread > 0 else (math.inf if loss > mean else 0.0)
            spiked = score > guard.z
            if spiked and self.world.main:
                print(
                    f"step {step}: loss spike {loss:.4f} ({score:.1f} standard deviations above "
                    f"the mean {mean:.4f} of the {len(history)} steps before; "
                    f"train.spike_guard.z={guard.z:g})",
                    flush=True,
                )
        if not spiked:
            history.append(loss)
            del history[: -self.spike_window]
        return spiked


def fmt_rows(rows) -> str:
    rows = [int(r) for r in rows]
    shown = ", ".join(map(str, rows[:16]))
    return shown + (f" and {len(rows) - 16} more" if len(rows) > 16 else "")
