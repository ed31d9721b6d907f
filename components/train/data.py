"""Which rows each process trains on, in what order, and how a batch is built.

The order is a pure function of (seed, epoch, rank, world size): micro batch k of a run is
always the same rows, so a resumed run continues the data order exactly from its step.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..artifacts import IGNORE_INDEX

if TYPE_CHECKING:
    pass


class BatchPlan:
    """Micro batches of `micro` rows for this rank: every rank gets the same number per epoch."""

    def __init__(self, n_rows: int, micro: int, rank: int, world: int, seed: int):
        self.n_rows, self.micro, self.rank, self.world, self.seed = n_rows, micro, rank, world, seed
        self.per_epoch = (n_rows // world) // micro
        self._epoch = -1
        self._rows: np.ndarray = np.zeros(0, dtype=np.int64)

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


def block_causal_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """(B, 1, L, L) bool: token i sees token j iff j <= i and both belong to the same example
    (an example starts where position_ids is 0)."""
    segment = torch.cumsum((position_ids == 0).long(), dim=1)
    length = position_ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=position_ids.device).tril()
    return ((segment[:, :, None] == segment[:, None, :]) & causal)[:, None]


def document_block_mask(position_ids: torch.Tensor, window: int | None = None):
    """flex_attention's sparse BlockMask for packed rows: causal within each example, and within
    the last `window` keys where given (a sliding-window layer); built on position_ids'
    device, never as a dense L x L tensor on the GPU's attention path."""
    from torch.nn.attention.flex_attention import create_block_mask

    segment = torch.cumsum((position_ids == 0).long(), dim=1)

    def same_example_causal(b, h, q, kv):
        return (segment[b, q] == segment[b, kv]) & (q >= kv)

    def within_window(b, h, q, kv):
        return same_example_causal(b, h, q, kv) & (q - kv < window)

    mask_mod = same_example_causal if window is None else within_window
    batch, length = position_ids.shape
    return create_block_mask(mask_mod, batch, None, length, length, device=position_ids.device)


FLEX_BLOCK = 128  # flex_attention's sparse block size


def flex_length(max_seq_len: int) -> int:
    """The one row length of every flex_attention batch: max_seq_len rounded up to whole
    blocks. A fixed shape compiles flex_attention's kernels once (static shapes), instead of
    a recompile per padded length."""
    return -(-max_seq_len // FLEX_BLOCK) * FLEX_BLOCK


def pad_length(attn: str, max_seq_len: int) -> int:
    """The length every batch is padded to: flex_length for flex_attention, else none (0)."""
    return flex_length(max_seq_len) if attn == "flex_attention" else 0


def collate(rows: list[dict], pad_id: int, attn: str, dtype: torch.dtype, pad_to: int = 0) -> dict:
    """Right-pad a batch (to at least `pad_to` tokens); pads are an example of their own with
    labels -100.

    flash-attention 2 separates packed examples from position_ids itself, and flex_attention
    gets a sparse document mask on the device (`document_block_mask`, built by the worker);
    SDPA and eager (the CPU fallback) get a dense block-diagonal causal mask (bool for SDPA,
    additive for eager), and only when a row holds more than one example or padding.
    """
    length = max(pad_to, *(len(r["input_ids"]) for r in rows))
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.as_tensor(r["input_ids"])
        labels[i, :n] = torch.as_tensor(r["labels"])
        positions[i, :n] = torch.as_tensor(r["position_ids"])
        positions[i, n:] = torch.arange(length - n)
    batch = {"input_ids": ids, "labels": labels, "position_ids": positions}
    dense = attn not in ("flash_attention_2", "flash_attention_3", "flex_attention")
    if dense and int((positions == 0).sum()) > len(rows):
        mask = block_causal_mask(positions)
        if attn == "eager":
            mask = torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, torch.finfo(dtype).min)
        batch["attention_mask"] = mask
    batch["tokens"] = sum(len(r["input_ids"]) for r in rows)  # real tokens
    batch["padded_tokens"] = ids.numel()  # what the GPU computes
    batch["examples"] = sum(sum(1 for p in r["position_ids"] if p == 0) for r in rows)
    batch["lengths"] = [len(r["input_ids"]) for r in rows]  # each row's real tokens, then pads
    return batch


def document_starts(positions: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """(rows, length) bool: where each real example (document) of a padded batch begins; the
    pads after a row's `lengths` tokens start none."""
    real = torch.arange(positions.shape[1])[None, :] < torch.tensor(lengths)[:, None]
    return (positions == 0) & real


def rank_batches(split, name: str, rank: int, world: int, size: int):
    """This rank's share of `split` (every world-th row) in batches of `size`: (the row
    indices, the rows tagged with `_row` and `_split` = name). Every rank gets as many batches
    (FSDP and ZeRO-3 forwards are collectives): one whose share has run out gets row 0 with no
    indices, to compute and discard."""
    indices = list(range(rank, len(split), world))
    for b in range(math.ceil(math.ceil(len(split) / world) / size)):
        chunk = indices[b * size : (b + 1) * size]
        yield chunk, [{**split[i], "_row": i, "_split": name} for i in chunk or [0]]


# host-side numbers of a batch, not inputs
COUNTS = ("tokens", "padded_tokens", "examples", "lengths")


def real_tokens(batch: dict, device) -> torch.Tensor:
    """(rows, length) float mask: 1.0 for each real token, 0.0 for the pads after it."""
    width = batch["input_ids"].shape[1]
    lengths = torch.tensor(batch["lengths"], device=device)
    return (torch.arange(width, device=device)[None, :] < lengths[:, None]).float()


class MicroBatches(torch.utils.data.Dataset):
    """Micro batch k of the run (BatchPlan's rows, collated): what the DataLoader's worker
    builds ahead of the training loop, in the plan's order."""

    def __init__(
        self,
        split,
        plan: BatchPlan,
        pad_id: int,
        attn: str,
        dtype: torch.dtype,
        pad_to: int = 0,
        objective=None,
    ):
        self.split, self.plan, self.pad_id, self.attn, self.dtype = split, plan, pad_id, attn, dtype
        self.pad_to = pad_to
        if objective is None:
            from ..objectives import REGISTRY

            objective = REGISTRY["sft"]
        self.objective = objective  # its columns and its batch format

    def __getitem__(self, k: int) -> dict:
        index = self.plan.rows(k)
        columns = self.split[[int(i) for i in index]]
        keys = self.objective.columns
        rows = [
            {**{c: columns[c][i] for c in keys}, "_row": int(index[i]), "_split": "train"}
            for i in range(len(columns[keys[0]]))
        ]
        return self.objective.collate(rows, self.pad_id, self.attn, self.dtype, self.pad_to)


def batch_loader(
    split,
    plan: BatchPlan,
    first: int,
    end: int,
    pad_id: int,
    attn: str,
    dtype,
    pin: bool,
    pad_to: int = 0,
    objective=None,
):
    """Micro batches first..end-1, built by one worker process ahead of the loop (pinned
    memory on a GPU), in exactly BatchPlan's order: a resumed run starts at its step. The
    objective (default: sft) says what a batch is."""
    return torch.utils.data.DataLoader(
        MicroBatches(split, plan, pad_id, attn, dtype, pad_to, objective),
        batch_size=None,
        sampler=range(first, end),
        num_workers=1,
        prefetch_factor=4,
        pin_memory=pin,
        # its own generator: starting the worker must not draw from the global RNG, whose
        # state (dropout) a resumed run restores exactly
        generator=torch.Generator().manual_seed(plan.seed),
    )
