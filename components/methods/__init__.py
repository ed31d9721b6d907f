"""Training methods, one module per family behind one interface (base.py's `Method`):
LoRA and QLoRA (lora.py), full fine-tuning (full.py), LLaMA-Adapter and Adapter v2
(adapter.py, with its modules in llama_adapter.py).

`method_of(cfg)` is the recipe's method; `named(name)` any registered one. No code outside
this package compares `cfg.method` with a name (tests/test_layout.py greps for it). A new
method: one module with its `Method` subclass, and its line in REGISTRY below.

Importing this package imports no torch: the config validates `method` against REGISTRY."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .adapter import Adapter, AdapterV2
from .base import Counts, Method
from .full import Full
from .lora import LoRA, QLoRA

if TYPE_CHECKING:
    from ..config import RunConfig

# In the order the recipe's `method` lists them.
REGISTRY: dict[str, Method] = {m.name: m for m in (QLoRA(), LoRA(), Full(), Adapter(), AdapterV2())}
NAMES = tuple(REGISTRY)

__all__ = ["NAMES", "REGISTRY", "Counts", "Method", "method_of", "named"]


def named(name: str) -> Method:
    return REGISTRY[name]


def method_of(cfg: RunConfig) -> Method:
    return REGISTRY[cfg.method]
