"""Which rows each process trains on, in what order, and how a batch is built.

The order is a pure function of (seed, epoch, rank, world size): micro batch k of a run is
always the same rows, so a resumed run continues the data order exactly from its step.
"""

from __future__ import annotations

import numpy as np
import torch

IGNORE = -100


class BatchPlan:
    """Micro batches of `micro` rows for this rank: every rank gets the same number per epoch."""

    def __init__(self, n_rows: int, micro: int, rank: int, world: int, seed: int):
        self.n_rows, self.micro, self.rank, self.world, self.seed = n_rows, micro, rank, world, seed
        self.per_epoch = (n_rows // world) // micro
        self._epoch, self._rows = -1, None

    def rows(self, k: int) -> np.ndarray:
        """Row indices of micro batch k (counting across epochs)."""
        epoch, j = divmod(k, self.per_epoch)
        if epoch != self._epoch:
            order = np.random.Generator(np.random.PCG64([self.seed, epoch])).permutation(
                self.n_rows
            )
            self._epoch, self._rows = epoch, order[self.rank :: self.world]
        return self._rows[j * self.micro : (j + 1) * self.micro]


def check_rows(dataset, n_rows: int, world: int, micro: int) -> None:
    """Every process needs at least one micro batch per epoch."""
    from ..errors import UserError

    if (n_rows // world) // micro == 0:
        raise UserError(
            f"{dataset}: the train split has {n_rows} rows, fewer than {world} "
            f"processes x train.micro_batch_size {micro}"
        )


def total_steps(cfg, per_epoch: int) -> int:
    if cfg.train.max_steps:
        return cfg.train.max_steps
    return max(1, int(cfg.train.epochs * per_epoch) // cfg.train.grad_accum)


def block_causal_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """(B, 1, L, L) bool: token i sees token j iff j <= i and both belong to the same example
    (an example starts where position_ids is 0)."""
    segment = torch.cumsum((position_ids == 0).long(), dim=1)
    length = position_ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=position_ids.device).tril()
    return ((segment[:, :, None] == segment[:, None, :]) & causal)[:, None]


def collate(rows: list[dict], pad_id: int, attn: str, dtype: torch.dtype) -> dict:
    """Right-pad a batch; pads are an example of their own with labels -100.

    flash-attention 2 separates packed examples from position_ids itself; SDPA and eager get a
    block-diagonal causal mask (bool for SDPA, additive for eager), and only when a row holds
    more than one example or padding.
    """
    length = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE, dtype=torch.long)
    positions = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.as_tensor(r["input_ids"])
        labels[i, :n] = torch.as_tensor(r["labels"])
        positions[i, :n] = torch.as_tensor(r["position_ids"])
        positions[i, n:] = torch.arange(length - n)
    batch = {"input_ids": ids, "labels": labels, "position_ids": positions}
    if attn != "flash_attention_2" and int((positions == 0).sum()) > len(rows):
        mask = block_causal_mask(positions)
        if attn == "eager":
            mask = torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, torch.finfo(dtype).min)
        batch["attention_mask"] = mask
    batch["tokens"] = sum(len(r["input_ids"]) for r in rows)
    return batch
