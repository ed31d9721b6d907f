"""Checkpoints for resume, in safetensors and JSON only (nothing is ever unpickled).

    OUT/checkpoints/step-0000020/
        trainer_state.json      step, losses so far, scheduler position, world size, strategy
        rank-00000.safetensors  this rank's trainable tensors, optimizer state, RNG state
        rank-00000.json         the non-tensor skeleton of this rank's optimizer state
        SHA256SUMS              every file's SHA-256 (`sha256sum -c SHA256SUMS` checks it)

Every rank writes into `.step-N.partial` and hashes its own files; after a barrier rank 0
gathers the digests into SHA256SUMS and renames the folder to `step-N`, so a folder named
`step-N` is always complete and a half-written one is ignored (and removed). A resume checks
the digests (each rank its own files) and falls back to the next older complete checkpoint
when one does not match (state.resume); the failed one is moved aside to `.step-N.corrupt`
and removed with the next successful save. `train.keep_checkpoints` keeps the newest N.
The data position is the step itself (see data.BatchPlan). With DeepSpeed the optimizer's
partitioned state is its own; its checkpoints keep weights, schedule and data position, and
the optimizer moments start again on resume.
"""

from __future__ import annotations

import hashlib
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
SUMS = "SHA256SUMS"
STATE = "trainer_state.json"


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


def complete_checkpoints(output: Path) -> list[Path]:
    """The complete `step-N` folders, newest first."""
    folder = output / "checkpoints"
    if not folder.is_dir():
        return []
    steps = [(int(m.group(1)), p) for p in folder.iterdir() if (m := STEP_DIR.match(p.name))]
    return [p for _, p in sorted(steps, reverse=True) if (p / STATE).is_file()]


def latest_checkpoint(output: Path) -> Path | None:
    found = complete_checkpoints(output)
    return found[0] if found else None


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def rank_files(rank: int) -> list[str]:
    return [f"rank-{rank:05d}.safetensors", f"rank-{rank:05d}.json"]


def verify(folder: Path, rank: int) -> str | None:
    """What is wrong with this rank's files of a checkpoint (rank 0: also trainer_state.json),
    by SHA256SUMS; None when they match. A checkpoint from before checksums has no SHA256SUMS
    and is taken as it is."""
    sums = folder / SUMS
    if not sums.is_file():
        return None
    expected = {}
    for line in sums.read_text(errors="replace").splitlines():
        digest, _, name = line.partition("  ")
        expected[name] = digest
    for name in rank_files(rank) + ([STATE] if rank == 0 else []):
        path = folder / name
        if name not in expected:
            return f"{name} is not in {SUMS} (the file list is damaged)"
        if not path.is_file():
            return f"{name} is missing"
        if sha256_of(path) != expected[name]:
            return f"{name} does not match its SHA-256 in {SUMS} (a corrupt or altered file)"
    return None


def set_aside(folder: Path) -> Path:
    """Move a checkpoint that failed its checksums out of the way (never read again)."""
    aside = folder.with_name(f".{folder.name}.corrupt")
    shutil.rmtree(aside, ignore_errors=True)
    folder.rename(aside)
    return aside


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


def remove_partial(output: Path, corrupt: bool = False) -> None:
    """Remove checkpoints a killed or failed save left half-written (they are never read), and
    with `corrupt` those set aside for failing their checksums."""
    for partial in (output / "checkpoints").glob(".step-*.partial"):
        shutil.rmtree(partial, ignore_errors=True)
    if corrupt:
        for aside in (output / "checkpoints").glob(".step-*.corrupt"):
            shutil.rmtree(aside, ignore_errors=True)


def save_checkpoint(
    output: Path,
    step: int,
    rank: int,
    params: dict,
    optimizer_state,
    state: dict,
    agree: Callable[[float], float],
    keep: int = 2,
) -> Path:
    """Save this rank's part; `agree(x)` is the all-reduced max of x over the ranks. A full
    disk (or a kill) half-way leaves only the staging folder: the last good checkpoint stays.
    The complete checkpoint's folder."""
    folder = output / "checkpoints"
    staging = folder / f".step-{step:07d}.partial"
    final = folder / f"step-{step:07d}"
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
    weights, skeleton_file = rank_files(rank)
    try:
        save_file(tensors, str(staging / weights))
        (staging / skeleton_file).write_text(json.dumps({"optimizer": skeleton}))
        # this rank's digests, read back from what was written; rank 0 gathers them
        lines = "".join(f"{sha256_of(staging / n)}  {n}\n" for n in (weights, skeleton_file))
        (staging / f"rank-{rank:05d}.sha256").write_text(lines)
    except Exception as exc:
        code = _save_fault(exc)
    _agreed_failure(folder, step, code, agree)
    if rank == 0:
        try:
            (staging / STATE).write_text(json.dumps(state, indent=1))
            parts = sorted(staging.glob("rank-*.sha256"))
            sums = "".join(p.read_text() for p in parts)
            (staging / SUMS).write_text(sums + f"{sha256_of(staging / STATE)}  {STATE}\n")
            for part in parts:
                part.unlink()
            staging.rename(final)
        except OSError as exc:
            code = _save_fault(exc)
    _agreed_failure(folder, step, code, agree)
    if rank == 0:
        done = sorted(p for p in folder.iterdir() if STEP_DIR.match(p.name))
        for old in done[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        remove_partial(output, corrupt=True)
    dist.barrier()
    return final


def read_step(folder: Path) -> int:
    match = STEP_DIR.match(folder.name)
    assert match, f"{folder} is a step-N folder"
    return int(match.group(1))


def read_state(folder: Path) -> dict:
    """A complete checkpoint's trainer_state.json."""
    return json.loads((folder / STATE).read_text())


def load_checkpoint(folder: Path, rank: int) -> tuple[dict, dict, dict | None, dict]:
    """(trainer state, params by name, optimizer state or None, all tensors) of this rank."""
    state = read_state(folder)
    weights, skeleton_file = rank_files(rank)
    tensors = load_file(str(folder / weights))
    skeleton = json.loads((folder / skeleton_file).read_text())["optimizer"]
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
