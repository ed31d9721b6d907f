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
