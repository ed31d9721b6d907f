"""The training loop's numbers, read without stalling the GPU.

Per-step losses stay on the device as tensors; `LossLog.flush` all-reduces them (with this
rank's token count) in one collective and reads them once: at logging steps, before a
checkpoint or an eval, and at the end. Nothing forces a host round trip per micro batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def synchronize(world) -> None:
    """Wait for the GPU's queued work (timings at the edges of pauses and of the run)."""
    if world.device.type == "cuda":
        torch.cuda.synchronize(world.device)


class LossLog:
    """Pending per-step losses on the device; `losses` gets `[step, mean loss]` on flush."""

    def __init__(self, world, losses: list, writer):
        self.world, self.losses, self.writer = world, losses, writer
        self.pending: list[tuple[int, torch.Tensor, float]] = []
        self.tokens = 0.0  # all ranks' tokens, as of the last flush
        self.local_tokens = 0

    def add(self, step: int, loss: torch.Tensor, lr: float, tokens: int) -> None:
        self.pending.append((step, loss, lr))
        self.local_tokens += tokens

    def flush(self) -> float | None:
        """Append the pending steps' losses, averaged over ranks; returns the last one."""
        if not self.pending:
            return None
        device = self.world.device if self.world.device.type == "cuda" else "cpu"
        tokens = torch.tensor(float(self.local_tokens), dtype=torch.float64, device=device)
        values = [loss.to(device, torch.float64) for _, loss, _ in self.pending] + [tokens]
        summed = torch.stack(values)
        dist.all_reduce(summed)
        *totals, all_tokens = summed.tolist()
        self.tokens += all_tokens
        self.local_tokens = 0
        for (step, _, lr), total in zip(self.pending, totals, strict=True):
            mean = total / self.world.size
            self.losses.append([step, round(mean, 6)])
            if self.writer is not None:
                self.writer.add_scalar("train/loss", mean, step)
                self.writer.add_scalar("train/lr", lr, step)
        self.pending.clear()
        return self.losses[-1][1]
