"""How long a training pod needs after SIGTERM (`terminationGracePeriodSeconds`): a drained or
preempted pod finishes its current step, saves a checkpoint (written, then read back for its
checksums) and exits. auto = 2 x (the plan's step time + the checkpoint's save time) + a minute,
on the recipe's GPU (hardware.gpu; without one the slowest of the common GPUs the plan knows).
`kubernetes.termination_grace_seconds` overrides it."""

from __future__ import annotations

import contextlib
import math
import sys

from ..config import RunConfig, dump_config

MARGIN_SECONDS = 60  # the process exiting, the volume's own flush, the kubelet's bookkeeping
FALLBACK_SECONDS = 600  # when the plan cannot size the model (an architecture it cannot build)
_PLANNED: dict[str, int] = {}  # by the dumped recipe: a job's pods and env ask more than once


def grace_seconds(cfg: RunConfig) -> int:
    setting = cfg.kubernetes.termination_grace_seconds
    if setting != "auto":
        return int(setting)
    key = dump_config(cfg)
    if key not in _PLANNED:
        _PLANNED[key] = _planned(cfg)
    return _PLANNED[key]


def _planned(cfg: RunConfig) -> int:
    try:  # what loading the model's code prints (DeepSpeed's accelerator line) is not the YAML's
        with contextlib.redirect_stdout(sys.stderr):
            step, save = step_and_save_seconds(cfg)
    except Exception:  # a model the plan cannot build on the meta device: a generous bound
        return FALLBACK_SECONDS
    return int(math.ceil(2 * (step + save) + MARGIN_SECONDS))


def step_and_save_seconds(cfg: RunConfig) -> tuple[float, float]:
    """(one optimizer step, one checkpoint's save and checksum) in seconds, by the plan."""
    from .forecast import checkpoint_seconds, options

    chosen, _ = options(cfg)
    step = max(option.step.step_seconds for option in chosen)
    return step, checkpoint_seconds(cfg, chosen[0].plan.arch)  # written and read back
