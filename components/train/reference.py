"""The reference model of dpo and ipo (components/objectives/preference.py), as
`train.reference` says (`reference_mode`):

- live, for a method that can switch its training off (LoRA, QLoRA, LLaMA-Adapter): the policy
  itself inside `Method.reference` (the adapters off): no second copy in memory;
- live, for the others (full, Adapter v2, whose trained norms cannot be switched off): a frozen
  copy of the base, with the policy's kernels and attention, sharded as the policy is (fsdp) or
  a replica (ddp);
- precomputed: one pass over the train and eval splits before the first step (the policy then
  is still the base: LoRA's B and the adapters' gates start at zero), every rank a share of
  the rows; the log-probabilities (one per document) are stored in OUTPUT/reference/ with the
  dataset's fingerprint and read back on resume, and each batch carries its rows'.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from ..methods import method_of
from ..objectives.preference import reference_mode
from .parallel import World

REFERENCE_DIR = "reference"


class Reference:
    """What the objective calls for the reference forward: `model`, and `()` the context in
    which it computes the reference (the method's adapters off, or nothing for a copy)."""

    def __init__(self, model, switch=None):
        self.model, self.switch = model, switch

    def __call__(self):
        return self.switch() if self.switch is not None else nullcontext()


def document_counts(split) -> np.ndarray:
    """Documents (examples) in each row of a prepared split: where its position ids are 0."""
    import pyarrow.compute as pc

    column = split.data.column("position_ids").combine_chunks()
    values = pc.list_flatten(column)
    parents = pc.list_parent_indices(column)
    starts = pc.filter(parents, pc.equal(values, 0)).to_numpy()
    return np.bincount(starts, minlength=len(split)).astype(np.int64)


@torch.no_grad()
def precompute(run, split, name: str, micro: int) -> tuple[np.ndarray, np.ndarray]:
    """(log-probability of every document's answer, in row order; each row's offset into
    it) under the model as it is now, the rows sharded over the ranks. Every rank runs the
    same number of forwards (FSDP and ZeRO-3 forwards are collectives)."""
    from ..objectives import row_tokens
    from .data import pad_length, rank_batches

    world: World = run.world
    counts = document_counts(split)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    out = torch.zeros(int(offsets[-1]), dtype=torch.float64)
    objective = run.objective
    pad_to = pad_length(run.attn, row_tokens(run.cfg))
    was_training = run.model.training
    run.model.eval()
    for chunk, rows in rank_batches(split, name, world.rank, world.size, micro):
        batch = objective.collate(
            rows, run.tokenizer.pad_token_id, run.attn, run.built.dtype, pad_to
        )
        logps, _ = objective.sequence_logps(
            run.model, batch, run.world.device, run.attn, Reference(run.model)
        )
        if chunk:
            at = 0
            for i in chunk:
                n = int(counts[i])
                out[offsets[i] : offsets[i] + n] = logps[at : at + n].double().cpu()
                at += n
    if was_training:
        run.model.train()
    if world.size > 1:
        import torch.distributed as dist

        device = world.device if world.device.type == "cuda" else "cpu"
        shared = out.to(device)
        dist.all_reduce(shared)
        out = shared.cpu()
    return out.numpy(), offsets


def stored(output: Path, fingerprint: str | None) -> dict | None:
    """The reference log-probabilities a run before this one stored, if they are this
    dataset's."""
    folder = output / REFERENCE_DIR
    record = folder / "reference.json"
    if not record.is_file():
        return None
    meta = json.loads(record.read_text())
    if meta.get("dataset_fingerprint") != fingerprint:
        raise UserError(
            f"{folder}: reference log-probabilities of another dataset "
            f"({meta.get('dataset_fingerprint')}, this run's is {fingerprint}): remove the "
            "folder or use a new output"
        )
    tables = {}
    for name in meta["splits"]:
        tables[name] = (np.load(folder / f"{name}.npy"), np.load(folder / f"{name}.offsets.npy"))
    return tables


def store(output: Path, tables: dict, fingerprint: str | None) -> None:
    """Rank 0 writes the tables, the record last (a folder with it is complete)."""
    folder = output / REFERENCE_DIR
    folder.mkdir(parents=True, exist_ok=True)
    for name, (flat, offsets) in tables.items():
        np.save(folder / f"{name}.npy", flat)
        np.save(folder / f"{name}.offsets.npy", offsets)
    meta = {"dataset_fingerprint": fingerprint, "splits": sorted(tables)}
    (folder / "reference.json").write_text(json.dumps(meta, indent=2))


def frozen_copy(run):
    """A frozen copy of the base for a live reference of a method that cannot switch its
    training off: loaded, patched and sharded as the policy is."""
    from .build import low_memory_fsdp, patched_base, with_kernels
    from .meta_load import materialize
    from .parallel import wrap_fsdp

    cfg, world, built = run.cfg, run.world, run.built
    if cfg.distributed.strategy == "deepspeed":
        raise UserError(
            "train.reference=live needs a frozen copy for method="
            f"{cfg.method}, which kubetune does not shard under deepspeed: set "
            "train.reference=precomputed"
        )
    model, _ = patched_base(cfg, world, run.attn, built.dtype, zero3=False)
    with_kernels(cfg, model, built.kernels)
    model.requires_grad_(False)
    model.config.use_cache = False
    if cfg.distributed.strategy == "fsdp":
        dist_cfg = cfg.distributed
        model = wrap_fsdp(model, world, built.dtype, dist_cfg.fsdp, dist_cfg.procs_per_node)
        if low_memory_fsdp(cfg):
            materialize(model, cfg, world)
    return model.eval()


def set_up(run) -> Reference | None:
    """The run's reference (live), or its precomputed log-probabilities handed to the
    objective (None returned); call after the policy is wrapped, before it resumes."""
    mode = reference_mode(run.cfg)
    if mode is None:
        return None
    method = method_of(run.cfg)
    if mode == "live":
        if method.switches_off:
            from .build import unwrap

            inner = unwrap(run.model)
            return Reference(run.model, lambda: method.reference(inner))
        return Reference(frozen_copy(run))
    fingerprint = run.stats.get("fingerprint")
    tables = stored(run.output, fingerprint)
    if tables is None:
        micro = run.cfg.train.micro_batch_size
        tables = {"train": precompute(run, run.train_split, "train", micro)}
        if run.eval_split is not None and len(run.eval_split):
            tables["eval"] = precompute(run, run.eval_split, "eval", micro)
        if run.world.main:
            store(run.output, tables, fingerprint)
            print(
                f"reference: log-probabilities of {sum(len(f) for f, _ in tables.values())} "
                f"answers computed before training (stored in {run.output / REFERENCE_DIR})",
                flush=True,
            )
    run.objective.precomputed = tables
    return None
