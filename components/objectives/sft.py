"""`sft`: supervised fine-tuning, the next-token cross-entropy over the completion's tokens
(prompt tokens are -100 in labels, set by prepare_dataset), on packed or padded rows."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..artifacts import IGNORE_INDEX
from .base import Loss, Objective, model_inputs, moe_metrics, routed, with_router_terms

if TYPE_CHECKING:
    import torch


class NextToken(Objective):
    """The loss, plus a MoE model's load-balancing loss (times its router_aux_loss_coef) in
    training; that model's metrics: router_aux_loss, expert_load_max, expert_load_min."""

    name = "sft"
    columns = ("input_ids", "labels", "position_ids")

    def metrics_for(self, model) -> tuple[str, ...]:
        return moe_metrics(model)

    def collate(
        self, rows: list[dict], pad_id: int, attn: str, dtype: torch.dtype, pad_to: int = 0
    ) -> dict:
        from ..train.data import collate

        return collate(rows, pad_id, attn, dtype, pad_to)

    def loss(self, model, batch: dict, device: torch.device, attn: str, reference=None) -> Loss:
        inputs = model_inputs(batch, device, attn)
        value, terms = routed(model, batch, device, lambda: model(**inputs).loss)
        return with_router_terms(model, Loss(value), terms)

    def weight(self, batch: dict) -> int:
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
