"""The train step (`kubetune train`, the KFP train task): check the data and the recipe, then
start the training worker: `local` runs torchrun here; `pytorchjob` creates a PyTorchJob,
`trainjob` a Kubeflow Trainer v2 TrainJob (both through ../cluster/).

All start the very same worker command (`worker_args`); the local backend adds torchrun's
own arguments, a PyTorchJob or TrainJob gets them from the PET_* environment its controller sets.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from ..artifacts import DATASET_DICT_FILE, METRICS_FILE, STATS_FILE
from ..cluster.pytorchjob import WORKER_MODULE
from ..config import RunConfig, write_resolved
from ..data_model_match import check_data_matches_model
from ..errors import UserError
from .data import check_rows
from .llama_adapter import check_recipe
from .worker import ERROR_FILE


def worker_args(recipe: Path, dataset: Path, output: Path) -> list[str]:
    return [
        "-m",
        WORKER_MODULE,
        "--recipe",
        str(recipe),
        "--dataset",
        str(dataset),
        "--output",
        str(output),
    ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_command(cfg: RunConfig, recipe: Path, dataset: Path, output: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc-per-node",
        str(cfg.distributed.procs_per_node),
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
        *worker_args(recipe, dataset, output),
    ]


def check_dataset(cfg: RunConfig, dataset: Path) -> None:
    """A finished `kubetune prepare` output with enough rows for every process."""
    if not (dataset / STATS_FILE).is_file() or not (dataset / DATASET_DICT_FILE).is_file():
        raise UserError(
            f"{dataset}: not a finished `kubetune prepare` output (no {STATS_FILE} or "
            f"{DATASET_DICT_FILE})"
        )
    rows = json.loads((dataset / STATS_FILE).read_text())["splits"]["train"]
    world = cfg.distributed.nodes * cfg.distributed.procs_per_node
    micro = cfg.train.micro_batch_size
    check_rows(dataset, rows, world, 1 if micro == "auto" else micro)
    check_data_matches_model(cfg.model, dataset)


def worker_env(cfg: RunConfig) -> dict[str, str]:
    env = dict(os.environ)
    import torch

    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
        env.setdefault(
            "OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // cfg.distributed.procs_per_node))
        )
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if cfg.model.local_dir:  # a fetched copy: every rank reads it, none asks the hub
        env["HF_HUB_OFFLINE"] = "1"
    return env


def train(cfg: RunConfig, dataset: str | Path, output: str | Path) -> int:
    """Run training to completion (resuming if OUTPUT holds checkpoints); the exit code."""
    if cfg.distributed.backend in ("pytorchjob", "trainjob"):
        from ..cluster.kube import launch

        # paths inside the pods; checked here only when this machine sees the same volume
        if Path(dataset).is_dir():
            check_dataset(cfg, Path(dataset))
        return launch(cfg, str(dataset), str(output))
    dataset, output = Path(dataset).resolve(), Path(output).resolve()
    check_dataset(cfg, dataset)
    check_recipe(cfg)
    if (output / METRICS_FILE).is_file():
        raise UserError(f"{output} holds a finished run ({METRICS_FILE}); choose another --output")
    output.mkdir(parents=True, exist_ok=True)
    (output / ERROR_FILE).unlink(missing_ok=True)
    recipe = write_resolved(cfg, output)
    proc = subprocess.Popen(
        torchrun_command(cfg, recipe, dataset, output),
        env=worker_env(cfg),
        start_new_session=True,
        stderr=subprocess.PIPE,
        text=True,
        bufsize=1,
    )

    def forward(signum, _frame):
        os.killpg(proc.pid, signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        report = relay_stderr(proc.stderr)
        code = proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    error = output / ERROR_FILE
    if code != 0 and error.is_file():
        raise UserError(error.read_text().strip())
    sys.stderr.write("".join(report))  # a real failure: torchrun's report is worth reading
    return code


def relay_stderr(stream) -> list[str]:
    """Copy the workers' stderr through as it comes, and hold back torchrun's own failure
    report: torchrun prefixes every worker line with `[rankN]:`, so an unprefixed traceback is
    torchrun failing, and it runs to the end. The caller prints it for a real failure and drops
    it when a worker already said what the user got wrong."""
    held: list[str] = []
    for line in stream:
        if held or line.startswith("Traceback (most recent call last):"):
            held.append(line)
        else:
            sys.stderr.write(line)
    return held
