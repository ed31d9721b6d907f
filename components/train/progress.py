"""The training loop's numbers, read without stalling the GPU.

Per-step losses stay on the device as tensors. `LossLog.flush` all-reduces the pending ones
(with this rank's token count) in one collective and starts their copy to pinned host memory
without waiting (`wait=False`, the logging steps): the values are read when that copy has
landed, at a later flush, so even `logging_steps: 1` costs no host sync. `wait=True` (before
a checkpoint or an eval, at the warm-up mark and at the end) reads everything pending. On the
CPU the copy is the read, and every flush is complete.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist


def finite(value: float) -> float | None:
    """A recorded figure: rounded, or None for NaN/inf (JSON has no NaN; guard.py skipped or
    stopped at that step)."""
    return round(value, 6) if math.isfinite(value) else None


def synchronize(world) -> None:
    """Wait for the GPU's queued work (timings at the edges of pauses and of the run)."""
    if world.device.type == "cuda":
        torch.cuda.synchronize(world.device)


class LossLog:
    """Pending per-step losses on the device; `losses` gets `[step, mean loss]` as they land."""

    def __init__(self, world, losses: list, writer, metrics: tuple[str, ...] = ()):
        self.world, self.losses, self.writer = world, losses, writer
        # the objective's own metrics, by name (in log order): [[step, mean over ranks], ...]
        self.metrics: dict[str, list] = {name: [] for name in metrics}
        self.pending: list[tuple[int, list[torch.Tensor], float]] = []
        self.in_flight: list[tuple[list, torch.Tensor, Any]] = []  # (steps, host copy, event)
        self.tokens = 0.0  # all ranks' tokens, as of the last landed flush
        self.local_tokens = 0

    def add(
        self, step: int, loss: torch.Tensor, lr: float, tokens: int, metrics: dict | None = None
    ) -> None:
        """A step's loss and the objective's metrics (each named in `metrics` at creation)."""
        given = metrics or {}
        if set(given) != set(self.metrics):
            raise ValueError(f"step {step}: metrics {sorted(given)}, expected {list(self.metrics)}")
        self.pending.append((step, [loss, *(given[name] for name in self.metrics)], lr))
        self.local_tokens += tokens

    def flush(self, wait: bool = True) -> list[tuple[int, float, float]]:
        """Reduce the pending steps' losses (a mean over ranks) and record those that have
        reached the host; `wait` waits for all of them. Returns the (step, loss, lr) recorded."""
        if self.pending:
            self._start()
        landed = []
        while self.in_flight:
            steps, host, event = self.in_flight[0]
            if event is not None and not wait and not event.query():
                break
            if event is not None:
                event.synchronize()
            self.in_flight.pop(0)
            landed += self._record(steps, host.tolist())
        return landed

    def _start(self) -> None:
        cuda = self.world.device.type == "cuda"
        device = self.world.device if cuda else "cpu"
        # a fill kernel, not a copy from host memory: torch.tensor(x, device=cuda) waits
        tokens = torch.full((), float(self.local_tokens), dtype=torch.float64, device=device)
        values = [v.to(device, torch.float64) for _, step, _ in self.pending for v in step]
        values.append(tokens)
        summed = torch.stack(values)
        dist.all_reduce(summed)
        event = None
        if cuda:
            host = torch.empty(summed.shape, dtype=summed.dtype, pin_memory=True)
            host.copy_(summed, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host = summed
        self.in_flight.append(([(step, lr) for step, _, lr in self.pending], host, event))
        self.local_tokens = 0
        self.pending = []

    def _record(self, steps: list, values: list[float]) -> list[tuple[int, float, float]]:
        *totals, all_tokens = values
        self.tokens += all_tokens
        width = 1 + len(self.metrics)  # the loss, then each metric
        landed = []
        for n, (step, lr) in enumerate(steps):
            loss, *metrics = (v / self.world.size for v in totals[n * width : (n + 1) * width])
            self.losses.append([step, finite(loss)])
            landed.append((step, loss, lr))
            if self.writer is not None:
                self.writer.add_scalar("train/loss", loss, step)
                self.writer.add_scalar("train/lr", lr, step)
            for name, value in zip(self.metrics, metrics, strict=True):
                self.metrics[name].append([step, finite(value)])
                if self.writer is not None:
                    self.writer.add_scalar(f"train/{name}", value, step)
        return landed
