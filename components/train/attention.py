"""Which attention the worker runs, and the flex_attention plumbing every family shares.

`model.attn_implementation: auto` picks, in this order:
- flash-attention 3 on Hopper (H100/H200) when its `flash_attn_interface` is installed, else
  flash-attention 2 when installed on CUDA: packed rows separated by their position ids
  (varlen kernels), no mask at all;
- on CUDA, for packed rows: PyTorch flex_attention with a sparse document mask (a `BlockMask`
  built on the device from the position ids). Llama, Mistral and Qwen2 use transformers' own
  flex path; Falcon (rotary, no ALiBi) uses its record's `flex_forward`
  (architectures/falcon.py), which gives
  Falcon-7B's single key/value head to every query head before the kernel: flex's GQA
  backward accumulates dK/dV for one KV head over all 71 query heads in one program per
  block, the slowest kernel of the step, where 71 independent heads run in parallel;
- else SDPA (eager for a family transformers gives no SDPA path: gpt-oss), with a dense
  block-diagonal mask for packed rows: the CPU fallback. A sliding-window layer gets that mask
  narrowed to its window (`windowed_masks`).
"""

from __future__ import annotations

import functools
import importlib.util
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..architectures import FLEX, auto_attention, family
from ..errors import UserError
from ..models import load_config

if TYPE_CHECKING:
    from ..config import RunConfig


def supports_flex_attention(config) -> bool:
    """A document-masked flex_attention path for the architecture: transformers' own, or the
    family record's (Falcon's: rotary only)."""
    return bool(family(config.model_type).flex_attention(config))


def attention_implementation(cfg: RunConfig, device: torch.device, packed: bool = False) -> str:
    """The attention the worker runs (see the module docstring)."""
    if cfg.model.attn_implementation == FLEX and device.type != "cuda":
        raise UserError(
            "model.attn_implementation=flex_attention trains on CUDA only (PyTorch's "
            f"flex_attention has no backward on {device.type}); use sdpa or auto"
        )
    if cfg.model.attn_implementation != "auto":
        return cfg.model.attn_implementation
    if device.type == "cuda":
        if (
            importlib.util.find_spec("flash_attn_interface") is not None
            and torch.cuda.get_device_capability(device)[0] == 9  # Hopper: H100, H200
        ):
            return "flash_attention_3"
        if importlib.util.find_spec("flash_attn") is not None:
            return "flash_attention_2"
    config = load_config(cfg.model)
    fallback = family(config.model_type).attention_fallback
    if device.type != "cuda":
        return fallback
    return auto_attention(packed, supports_flex_attention(config), fallback)


def transformers_attention(attn: str, model_type: str) -> str:
    """What transformers builds the model with: a family with its own flex forward (Falcon)
    builds on SDPA and installs it (use_flex_attention)."""
    return family(model_type).flex_build if attn == FLEX else attn


@functools.cache
def compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def use_flex_attention(model: nn.Module) -> None:
    """Static shapes for flex_attention's compiled kernels, and a Falcon model's attention
    layers the flex path (others have transformers').

    The worker pads every flex batch to one length (`data.flex_length`), so each kernel
    compiles once per batch shape. Left to itself, torch.compile would recompile on the second
    shape it saw with symbolic lengths, which PyTorch 2.11's flex_attention lowering could not
    do on the H100 and H200 it ran on ("NoValidChoicesError: No choices exist for backend")."""
    torch._dynamo.config.automatic_dynamic_shapes = False
    install = family(model.config.model_type).install_flex
    if install is not None:
        install(model)


def attention_windows(config) -> dict[str, int | None] | int | None:
    """The sliding windows of a model's attention, as transformers applies them: {layer type:
    its window, or None} for a config with `layer_types` that has sliding layers (Gemma 3,
    gpt-oss: transformers then takes the masks as a dict by layer type); one window for every
    layer (Mistral with its sliding_window set); None where no layer has one."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if types:
        if not window or "sliding_attention" not in types:
            return None
        return {kind: window if kind == "sliding_attention" else None for kind in set(types)}
    if window and getattr(config, "use_sliding_window", True) is not False:
        return window
    return None


def narrowed(mask, window: int, position_ids: torch.Tensor):
    """A packed row's 4-D mask (bool or additive, or flex's BlockMask) with every query seeing
    only the last `window` keys of its example (transformers' rule: q - kv < window)."""
    from .data import document_block_mask

    if not isinstance(mask, torch.Tensor):  # a BlockMask: rebuilt with the window
        return document_block_mask(position_ids, window)
    length = mask.shape[-1]
    index = torch.arange(length, device=mask.device)
    band = (index[:, None] - index[None, :]) < window
    if mask.dtype == torch.bool:
        return mask & band
    return mask.masked_fill(~band, torch.finfo(mask.dtype).min)


def windowed_masks(model: nn.Module) -> bool:
    """Keep a sliding-window family's windows on packed rows. A packed row comes with a 4-D
    mask (the dense block-diagonal one, or flex_attention's BlockMask), which transformers
    passes to every layer as given, so a sliding layer would attend over the whole example.
    A pre-hook on the decoder stack narrows that mask to each layer type's window (the
    varlen flash kernels need none: transformers gives them the layer's window). Returns
    whether the model has windows."""
    windows = attention_windows(model.config)
    if windows is None:
        return False

    def hook(_module, args, kwargs):
        mask, positions = kwargs.get("attention_mask"), kwargs.get("position_ids")
        if mask is None or isinstance(mask, dict) or len(mask.shape) != 4 or positions is None:
            return None
        if isinstance(windows, int):
            kwargs["attention_mask"] = narrowed(mask, windows, positions)
        else:
            kwargs["attention_mask"] = {
                kind: narrowed(mask, w, positions) if w else mask for kind, w in windows.items()
            }
        return args, kwargs

    model.base_model.register_forward_pre_hook(hook, with_kwargs=True)
    return True
