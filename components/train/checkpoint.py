"""Checkpoints for resume, in safetensors and JSON only (nothing is ever unpickled).

    OUT/checkpoints/step-0000020/
        trainer_state.json      step, losses so far, scheduler position, world size, strategy
        rank-00000.safetensors  this rank's trainable tensors, optimizer state, RNG state
        rank-00000.json         the non-tensor skeleton of this rank's optimizer state

Every rank writes into `.step-N.partial`; after a barrier rank 0 renames it to `step-N`, so a
folder named `step-N` is always complete and a half-written one is ignored (and removed).
The data position is the step itself (see data.BatchPlan). With DeepSpeed the optimizer's
partitioned state is its own; its checkpoints keep weights, schedule and data position, and
the optimizer moments start again on resume.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from ..errors import UserError
from ..outputs import STORAGE_CAUSES, storage_errno

STEP_DIR = re.compile(r"^step-(\d+)$")


def flatten(obj, tensors: dict, prefix: str):
    """Nested dicts/lists of tensors and scalars → JSON skeleton + flat tensor dict."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = local(obj).detach().to("cpu").contiguous().clone()
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        return {"__dict__": [[k, flatten(v, tensors, f"{prefix}.{k}")] for k, v in obj.items()]}
    if isinstance(obj, list | tuple):
        kind = "__tuple__" if isinstance(obj, tuple) else "__list__"
        return {kind: [flatten(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]}
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise TypeError(f"cannot checkpoint a {type(obj).__name__} at {prefix}")


def unflatten(skeleton, tensors: dict):
    if isinstance(skeleton, dict):
        if "__tensor__" in skeleton:
            return tensors[skeleton["__tensor__"]]
        if "__dict__" in skeleton:
            return {k: unflatten(v, tensors) for k, v in skeleton["__dict__"]}
        if "__list__" in skeleton:
            return [unflatten(v, tensors) for v in skeleton["__list__"]]
        if "__tuple__" in skeleton:
            return tuple(unflatten(v, tensors) for v in skeleton["__tuple__"])
    return skeleton


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a parameter (FSDP2 DTensor), or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def rng_tensors() -> dict[str, torch.Tensor]:
    state = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["rng.cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(tensors: dict) -> None:
    torch.set_rng_state(tensors["rng.cpu"])
    if torch.cuda.is_available() and "rng.cuda" in tensors:
        torch.cuda.set_rng_state(tensors["rng.cuda"])


def latest_checkpoint(output: Path) -> Path | None:
    folder = output / "checkpoints"
    if not folder.is_dir():
        return None
    steps = [(int(m.group(1)), p) for p in folder.iterdir() if (m := STEP_DIR.match(p.name))]
    complete = [(s, p) for s, p in steps if (p / "trainer_state.json").is_file()]
    return max(complete)[1] if complete else None


def _save_fault(exc: Exception) -> int:
    """The errno of a storage fault (anything else is re-raised)."""
    code = storage_errno(exc)
    if code is None:
        raise exc
    return code


def _agreed_failure(folder: Path, step: int, code: int, agree: Callable[[float], float]) -> None:
    """Every rank learns whether any rank failed to write its part (a collective, so it is
    also the barrier), and all stop together with the same line: no rank is left waiting."""
    worst = int(agree(float(code)))
    if worst:
        shutil.rmtree(folder / f".step-{step:07d}.partial", ignore_errors=True)
        raise UserError(
            f"{folder}: cannot save the checkpoint of step {step} "
            f"({STORAGE_CAUSES.get(worst, f'errno {worst}')}); the last complete checkpoint is "
            "kept and a rerun resumes from it"
        )


def remove_partial(output: Path) -> None:
    """Remove checkpoints a killed or failed save left half-written (they are never read)."""
    for partial in (output / "checkpoints").glob(".step-*.partial"):
        shutil.rmtree(partial, ignore_errors=True)


def save_checkpoint(
    output: Path,
    step: int,
    rank: int,
    params: dict,
    optimizer_state,
    state: dict,
    agree: Callable[[float], float],
    keep: int = 2,
) -> None:
    """Save this rank's part; `agree(x)` is the all-reduced max of x over the ranks. A full
    disk (or a kill) half-way leaves only the staging folder: the last good checkpoint stays."""
    folder = output / "checkpoints"
    staging = folder / f".step-{step:07d}.partial"
    code = 0
    if rank == 0:
        shutil.rmtree(staging, ignore_errors=True)
        try:
            staging.mkdir(parents=True)
        except OSError as exc:
            code = _save_fault(exc)
    _agreed_failure(folder, step, code, agree)
    tensors = {
        f"param.{k}": local(v).detach().to("cpu").contiguous().clone() for k, v in params.items()
    }
    skeleton = flatten(optimizer_state, tensors, "optim") if optimizer_state is not None else None
    tensors.update(rng_tensors())
    try:
        save_file(tensors, str(staging / f"rank-{rank:05d}.safetensors"))
        (staging / f"rank-{rank:05d}.json").write_text(json.dumps({"optimizer": skeleton}))
    except Exception as exc:
        code = _save_fault(exc)
    _agreed_failure(folder, step, code, agree)
    if rank == 0:
        try:
            (staging / "trainer_state.json").write_text(json.dumps(state, indent=1))
            staging.rename(folder / f"step-{step:07d}")
        except OSError as exc:
            code = _save_fault(exc)
    _agreed_failure(folder, step, code, agree)
    if rank == 0:
        done = sorted(p for p in folder.iterdir() if STEP_DIR.match(p.name))
        for old in done[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        remove_partial(output)
    dist.barrier()


def read_state(folder: Path) -> dict:
    """A complete checkpoint's trainer_state.json."""
    return json.loads((folder / "trainer_state.json").read_text())


def load_checkpoint(folder: Path, rank: int) -> tuple[dict, dict, dict | None, dict]:
    """(trainer state, params by name, optimizer state or None, all tensors) of this rank."""
    state = read_state(folder)
    tensors = load_file(str(folder / f"rank-{rank:05d}.safetensors"))
    skeleton = json.loads((folder / f"rank-{rank:05d}.json").read_text())["optimizer"]
    params = {k[len("param.") :]: v for k, v in tensors.items() if k.startswith("param.")}
    optim = unflatten(skeleton, tensors) if skeleton is not None else None
    return state, params, optim, tensors


def restore_params(named: dict, saved: dict) -> None:
    missing = set(named) - set(saved)
    if missing:
        raise RuntimeError(f"checkpoint lacks {sorted(missing)[:3]}")
    with torch.no_grad():
        for name, p in named.items():
            local(p).copy_(saved[name].to(local(p).device, local(p).dtype))
