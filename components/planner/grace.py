"""How long a training pod needs after SIGTERM (`terminationGracePeriodSeconds`): a drained or
preempted pod finishes its current step, saves a checkpoint (written, then read back for its
checksums) and exits. auto = 2 x (the plan's step time + the checkpoint's save time) + a minute,
on the recipe's GPU (hardware.gpu; without one the slowest of the common GPUs the plan knows).
`kubernetes.termination_grace_seconds` overrides it."""

from __future__ import annotations

import contextlib
import math
import sys
from functools import lru_cache

from ..config import RunConfig, dump_config
from ..methods import method_of

MARGIN_SECONDS = 60  # the process exiting, the volume's own flush, the kubelet's bookkeeping
FALLBACK_SECONDS = 600  # when the plan cannot size the model (an architecture it cannot build)


def grace_seconds(cfg: RunConfig) -> int:
    setting = cfg.kubernetes.termination_grace_seconds
    if setting != "auto":
        return int(setting)
    return _planned(dump_config(cfg))


@lru_cache(maxsize=64)
def _planned(recipe_text: str) -> int:
    from ..config import parse_recipe

    cfg = parse_recipe(recipe_text, "<recipe>", [])
    try:  # what loading the model's code prints (DeepSpeed's accelerator line) is not the YAML's
        with contextlib.redirect_stdout(sys.stderr):
            step, save = step_and_save_seconds(cfg)
    except Exception:  # a model the plan cannot build on the meta device: a generous bound
        return FALLBACK_SECONDS
    return int(math.ceil(2 * (step + save) + MARGIN_SECONDS))


def step_and_save_seconds(cfg: RunConfig) -> tuple[float, float]:
    """(one optimizer step, one checkpoint's save and checksum) in seconds, by the plan."""
    from .architecture import architecture
    from .forecast import options
    from .speed import SAVE_BYTES_S

    arch = architecture(cfg)
    chosen, _ = options(cfg)
    step = max(option.step.step_seconds for option in chosen)
    checkpoint = method_of(cfg).checkpoint_bytes(arch)
    return step, 2 * checkpoint / SAVE_BYTES_S  # written, then read back for SHA256SUMS
