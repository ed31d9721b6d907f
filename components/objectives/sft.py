"""`sft`: supervised fine-tuning, the next-token cross-entropy over the completion's tokens
(prompt tokens are -100 in labels, set by prepare_dataset), on packed or padded rows."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..artifacts import IGNORE_INDEX
from .base import Loss, Objective

if TYPE_CHECKING:
    import torch


MOE_METRICS = ("router_aux_loss", "expert_load_max", "expert_load_min")


class NextToken(Objective):
    """The loss, plus a MoE model's load-balancing loss (times its router_aux_loss_coef) in
    training; that model's metrics: router_aux_loss, expert_load_max, expert_load_min."""

    name = "sft"
    columns = ("input_ids", "labels", "position_ids")

    def metrics_for(self, model) -> tuple[str, ...]:
        from ..train.moe import watch_of

        return MOE_METRICS if watch_of(model) is not None else ()

    def collate(
        self, rows: list[dict], pad_id: int, attn: str, dtype: torch.dtype, pad_to: int = 0
    ) -> dict:
        from ..train.data import collate

        return collate(rows, pad_id, attn, dtype, pad_to)

    def loss(self, model, batch: dict, device: torch.device, attn: str, reference=None) -> Loss:
        from ..train.attention import FLEX
        from ..train.data import COUNTS, document_block_mask, real_tokens
        from ..train.moe import watch_of

        inputs = {k: v.to(device, non_blocking=True) for k, v in batch.items() if k not in COUNTS}
        if attn == FLEX:  # packed rows: a sparse document mask, built on the device
            inputs["attention_mask"] = document_block_mask(inputs["position_ids"])
        watch = watch_of(model) if model.training else None
        if watch is None:
            return Loss(model(**inputs).loss)
        with watch.recording():  # a MoE model in training: its routers' terms too
            value = model(**inputs).loss
        aux, load = watch.terms(real_tokens(batch, device))
        return Loss(value + watch.coef * aux, {"router_aux_loss": aux.detach(), **load})

    def weight(self, batch: dict) -> int:
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
