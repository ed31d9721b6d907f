"""Which kernels a run uses (`select_kernels`: train/kernels.py's docstring says what each
choice means) and the chunked loss's rows per chunk: decided before any model is built, by the
worker and by `kubetune plan` alike."""

from __future__ import annotations

import importlib.util
import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from ..architectures import family, supporting
from ..errors import UserError
from ..methods import method_of

if TYPE_CHECKING:
    import torch

    from ..config import RunConfig


@dataclass(frozen=True)
class Kernels:
    """What the worker runs; written to metrics.json as `kernels`."""

    rms_norm: str = "transformers"  # transformers | liger
    rope: str = "transformers"
    swiglu: str = "transformers"
    loss: str = "transformers"  # transformers | chunked_linear_ce | liger_fused_linear_ce
    compile: bool = False
    lora: str = "none"  # fused | peft | none (no LoRA layers)

    @property
    def liger_modules(self) -> bool:
        return self.rms_norm == "liger"

    def as_dict(self) -> dict:
        return asdict(self)


def liger_installed() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def compile_choice(cfg: RunConfig, device: torch.device, packed: bool) -> bool:
    """train.compile: auto is on where it is known to work: CUDA, ddp or fsdp (ZeRO-3's
    hooks and compiled graphs do not mix), packed rows padded to one length."""
    setting = cfg.train.compile
    if setting != "auto":
        return setting
    return device.type == "cuda" and cfg.distributed.strategy != "deepspeed" and packed


def lora_choice(cfg: RunConfig) -> str:
    if not method_of(cfg).lora_matmuls:
        return "none"
    return "peft" if cfg.distributed.strategy == "deepspeed" else "fused"


def select_kernels(
    cfg: RunConfig,
    device: torch.device,
    model_type: str,
    packed: bool = False,
    liger_available: bool | None = None,
) -> Kernels:
    """The kernels for this recipe, device and architecture (see the module docstring).

    Under DeepSpeed ZeRO-3 the output head is partitioned: the loss gathers a frozen head
    (LoRA) for the chunked loss; a trained head (full) keeps transformers' loss. Adapter v2's
    head has its own bias and scale, which only the head's own forward applies: it keeps
    transformers' loss everywhere. `liger_available`: whether liger-kernel is there (default:
    installed here; `kubetune plan` asks for the trainer image, which has it)."""
    choice = cfg.train.kernels
    compiled, lora = compile_choice(cfg, device, packed), lora_choice(cfg)
    if choice == "none":
        return Kernels(compile=compiled, lora=lora)
    zero3 = cfg.distributed.strategy == "deepspeed" and cfg.distributed.zero_stage == 3
    method = method_of(cfg)
    head_forward = (zero3 and method.trains_base) or method.head_forward
    chunked = "transformers" if head_forward else "chunked_linear_ce"
    why_not = None
    if device.type != "cuda":
        why_not = f"Liger's Triton kernels need a CUDA device, this run is on {device.type}"
    elif not family(model_type).liger:
        why_not = (
            f"Liger has no kernels for model type {model_type!r} "
            f"(it patches {', '.join(supporting(lambda r: r.liger))})"
        )
    elif not (liger_installed() if liger_available is None else liger_available):
        why_not = "liger-kernel is not installed (pip install 'kubetune[gpu]')"
    if why_not is None:
        loss = chunked if zero3 or head_forward else "liger_fused_linear_ce"
        return Kernels("liger", "liger", "liger", loss, compiled, lora)
    if choice == "liger":
        raise UserError(f"train.kernels=liger: {why_not}")
    return Kernels(loss=chunked, compile=compiled, lora=lora)


def chunk_rows(rows: int, hidden: int, vocab: int) -> int:
    """Rows per chunk: the chunk's logits about as large as the hidden states (Liger's rule),
    a power of two of at least 256."""
    ratio = max(1, math.ceil(vocab / hidden))
    return max(256, 1 << max(0, math.ceil(rows / ratio) - 1).bit_length())
