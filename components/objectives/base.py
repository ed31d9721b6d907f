"""The interface of a training objective (`Objective`): what a batch is, the loss, and the
metrics logged beside it. The training loop and the evaluation loop call only this, so an
objective that trains on pairs of sequences or with a reference model's log-probabilities
plugs in here without touching either loop."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from ..config import RunConfig


@dataclass
class Loss:
    """One micro batch's loss (what backward runs on) and the objective's own metrics, each a
    0-dim tensor on the device (no host sync in the loop): logged as `train/NAME`."""

    value: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


class Objective:
    name: str = ""
    columns: tuple[str, ...] = ()  # what a prepared row holds for it
    metrics: tuple[str, ...] = ()  # the names its Loss.metrics carries, in log order
    needs_reference = False  # its loss compares with a reference model's log-probabilities
    data_format: str | None = None  # the data.format it needs (None: any but preference)

    def configured(self, cfg: RunConfig) -> Objective:
        """This objective with the recipe's parameters for it."""
        return self

    def validate(self, cfg: RunConfig) -> None:
        """Settings this objective cannot run with: ValueError naming the key."""
        if cfg.data.format == "preference":
            raise ValueError(
                f"data.format=preference holds pairs for a preference objective (dpo, ipo, "
                f"simpo, orpo), not train.objective={self.name}"
            )
        if cfg.preference.model_fields_set:
            raise ValueError(f"preference.* has no meaning for train.objective={self.name}")

    def metrics_for(self, model) -> tuple[str, ...]:
        """The metrics its Loss carries when training `model` (some depend on the model)."""
        return self.metrics

    def collate(
        self, rows: list[dict], pad_id: int, attn: str, dtype: torch.dtype, pad_to: int = 0
    ) -> dict:
        """A batch of rows for `loss`, with the host-side counts train/data.py's COUNTS names
        (real tokens, computed tokens, examples)."""
        raise NotImplementedError

    def loss(self, model, batch: dict, device: torch.device, attn: str, reference=None) -> Loss:
        """`reference`: the run's reference model (train/reference.py) for objectives that
        need one live; None otherwise."""
        raise NotImplementedError

    def weight(self, batch: dict) -> int:
        """What the evaluation's mean loss is weighted by (tokens the loss is averaged over)."""
        raise NotImplementedError


# a MoE model's metrics beside any objective's, while it trains (train/moe.py's RouterWatch)
MOE_METRICS = ("router_aux_loss", "expert_load_max", "expert_load_min")


def moe_metrics(model) -> tuple[str, ...]:
    """MOE_METRICS for a MoE model with a router watch, else none."""
    from ..train.moe import watch_of

    return MOE_METRICS if watch_of(model) is not None else ()


def model_inputs(batch: dict, device, attn: str, skip: tuple[str, ...] = ()) -> dict:
    """The batch's model inputs on the device: its host-side counts and `skip` left out; packed
    rows under flex_attention get their sparse document mask, built on the device."""
    from ..train.attention import FLEX
    from ..train.data import COUNTS, document_block_mask

    leave = COUNTS + skip
    inputs = {k: v.to(device, non_blocking=True) for k, v in batch.items() if k not in leave}
    if attn == FLEX:
        inputs["attention_mask"] = document_block_mask(inputs["position_ids"])
    return inputs


def routed(model, batch: dict, device, forward):
    """`forward()`, recorded by a MoE model's router watch while it trains: (its result, the
    routers' (aux loss, load) terms, or None for a dense model or in evaluation)."""
    from ..train.data import real_tokens
    from ..train.moe import watch_of

    watch = watch_of(model) if model.training else None
    if watch is None:
        return forward(), None
    with watch.recording():
        out = forward()
    return out, watch.terms(real_tokens(batch, device))


def with_router_terms(model, loss: Loss, terms) -> Loss:
    """`loss` plus a MoE model's load-balancing loss (times its router_aux_loss_coef) and its
    MOE_METRICS, from `routed`'s terms (None: `loss` as it is)."""
    if terms is None:
        return loss
    from ..train.moe import watch_of

    watch = watch_of(model)
    assert watch is not None, "routed() recorded the routers through it"
    aux, load = terms
    return Loss(
        loss.value + watch.coef * aux, {**loss.metrics, "router_aux_loss": aux.detach(), **load}
    )
