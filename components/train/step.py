"""The train step (`kubetune train`, the KFP train task): check the data and the recipe, then
start the training worker through the backend `distributed.backend` names (../backends/:
`local` runs torchrun here, `pytorchjob` creates a PyTorchJob, `trainjob` a Kubeflow Trainer v2
TrainJob). All start the very same worker command.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..artifacts import DATASET_DICT_FILE, STATS_FILE
from ..backends.base import training_backend
from ..config import RunConfig
from ..data_model_match import check_data_matches_model
from ..errors import UserError
from .data import check_rows


def check_dataset(cfg: RunConfig, dataset: Path) -> None:
    """A finished `kubetune prepare` output with enough rows for every process."""
    if not (dataset / STATS_FILE).is_file() or not (dataset / DATASET_DICT_FILE).is_file():
        raise UserError(
            f"{dataset}: not a finished `kubetune prepare` output (no {STATS_FILE} or "
            f"{DATASET_DICT_FILE})"
        )
    rows = json.loads((dataset / STATS_FILE).read_text())["splits"]["train"]
    world = cfg.distributed.world_size
    micro = cfg.train.micro_batch_size
    check_rows(dataset, rows, world, 1 if micro == "auto" else micro)
    check_data_matches_model(cfg.model, dataset)


def train(
    cfg: RunConfig,
    dataset: str | Path,
    output: str | Path,
    task=None,
    job_name: str | None = None,
) -> int:
    """Run training to completion (resuming if OUTPUT holds checkpoints); the exit code. `task`
    and `job_name`: what a KFP train task hands a cluster backend (base.py)."""
    backend = training_backend(cfg)
    # a cluster backend's paths are inside the pods: checked here only when this machine sees
    # the same volume
    if backend.local or Path(dataset).is_dir():
        check_dataset(cfg, Path(dataset).resolve() if backend.local else Path(dataset))
    if backend.local:
        from ..methods import method_of

        method_of(cfg).check_model(cfg)
    return backend.launch(cfg, str(dataset), str(output), task, job_name)
