"""Training objectives (`train.objective`), one module each behind base.py's `Objective`:
`sft`, the next-token loss (sft.py); `dpo`, `ipo`, `simpo`, `orpo` on preference pairs
(preference.py). `objective_of(cfg)` is the recipe's, with its parameters.

A new objective: a module with its `Objective` subclass, its line in REGISTRY below (the
recipe's `train.objective` accepts the registered names) and, if its rows differ, what
prepare_dataset writes for it."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import Loss, Objective
from .preference import DPO, IPO, ORPO, SimPO
from .sft import NextToken

if TYPE_CHECKING:
    from ..config import RunConfig

REGISTRY: dict[str, Objective] = {o.name: o for o in (NextToken(), DPO(), IPO(), SimPO(), ORPO())}
NAMES = tuple(REGISTRY)

__all__ = ["NAMES", "REGISTRY", "Loss", "Objective", "objective_of", "row_tokens"]


def row_tokens(cfg: RunConfig) -> int:
    """The most tokens a prepared row holds: data.max_seq_len, twice that for preference
    data (a pair of sequences, or packed pairs)."""
    return cfg.data.max_seq_len * (2 if cfg.data.format == "preference" else 1)


def objective_of(cfg: RunConfig) -> Objective:
    return REGISTRY[cfg.train.objective].configured(cfg)
