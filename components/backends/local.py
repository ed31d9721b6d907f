"""The `local` backend: torchrun on this machine, one worker process per
`distributed.procs_per_node` (CPU + gloo where there is no GPU). Without CUDA the workers are
forked from a launcher that has imported the worker once (forked_launch.py: torchrun's own
elastic launcher with a function entrypoint), which halves a tiny run's CPU time; with CUDA
each worker is a fresh interpreter, as in a pod.

The workers' stderr comes through as it is written; torchrun's own failure report is held
back and printed only for a real failure: a worker that stopped on a user error (a bad recipe
value, data the model cannot take) wrote it to ERROR_FILE, and that one line is the error.
SIGTERM and SIGINT go on to the whole torchrun process group.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

from ..artifacts import METRICS_FILE
from ..config import RunConfig, write_resolved
from ..errors import UserError
from ..outputs import check_parent, disk_errors
from ..train.entry import ERROR_FILE, PREEMPTED_EXIT, PREEMPTED_FILE, worker_args


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_command(
    cfg: RunConfig, recipe: Path, dataset: Path, output: Path, forked: bool = False
) -> list[str]:
    """torchrun and the worker module; `forked`: the workers forked from a launcher that has
    imported them already (forked_launch.py; only where there is no CUDA)."""
    launcher = "kubetune.components.backends.forked_launch" if forked else "torch.distributed.run"
    return [
        sys.executable,
        "-m",
        launcher,
        "--nnodes",
        "1",
        "--nproc-per-node",
        str(cfg.distributed.procs_per_node),
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
        *worker_args(str(recipe), str(dataset), str(output)),
    ]


LAUNCHER_ENV = "KUBETUNE_LOCAL_LAUNCHER"  # forked or torchrun: overrides the choice below
LOCAL_GRACE_SECONDS = 300  # TORCH_ELASTIC_SHUTDOWN_TIMEOUT of local workers (worker_env)


def forked_workers() -> bool:
    """Whether the workers are forked from a launcher that imported them (forked_launch.py):
    only where torch sees no CUDA device (forking after CUDA is initialised is unsafe), unless
    KUBETUNE_LOCAL_LAUNCHER says torchrun (or forked)."""
    choice = os.environ.get(LAUNCHER_ENV, "")
    if choice not in ("", "forked", "torchrun"):
        raise UserError(f"{LAUNCHER_ENV}={choice}: forked or torchrun")
    if choice:
        return choice == "forked"
    import torch

    return not torch.cuda.is_available()


def worker_env(cfg: RunConfig) -> dict[str, str]:
    env = dict(os.environ)
    import torch

    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
        env.setdefault(
            "OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // cfg.distributed.procs_per_node))
        )
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    # after a SIGTERM torchrun waits this long for the workers' checkpoint before SIGKILL
    env.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(LOCAL_GRACE_SECONDS))
    if cfg.model.local_dir:  # a fetched copy: every rank reads it, none asks the hub
        env["HF_HUB_OFFLINE"] = "1"
    return env


WORKER_ERROR = re.compile(r"^(?:\[rank\d+\]:)?error: (.+)$")


def relay_stderr(stream) -> tuple[list[str], str | None]:
    """Copy the workers' stderr through as it comes, and hold back torchrun's own failure
    report: torchrun prefixes every worker line with `[rankN]:`, so an unprefixed traceback is
    torchrun failing, and it runs to the end. The caller prints it for a real failure and drops
    it when a worker already said what the user got wrong. A worker's `error: ...` line is held
    back too and returned (every rank may print it; the caller says it once, also when a full
    disk kept it from ERROR_FILE)."""
    held: list[str] = []
    said = None
    for line in stream:
        if held or line.startswith("Traceback (most recent call last):"):
            held.append(line)
        elif found := WORKER_ERROR.match(line.rstrip("\n")):
            said = said or found.group(1)
        else:
            sys.stderr.write(line)
    return held, said


class LocalBackend:
    name = "local"
    local = True

    def launch(self, cfg: RunConfig, dataset: str, output: str, task=None, job_name=None) -> int:
        """torchrun here (a local run has no job: `task` and `job_name` are the cluster's)."""
        out = Path(output).resolve()
        if (out / METRICS_FILE).is_file():
            raise UserError(f"{out} holds a finished run ({METRICS_FILE}); choose another --output")
        check_parent(out)
        with disk_errors(out):
            out.mkdir(exist_ok=True)
            (out / ERROR_FILE).unlink(missing_ok=True)
            (out / PREEMPTED_FILE).unlink(missing_ok=True)
            recipe = write_resolved(cfg, out)
        proc = subprocess.Popen(
            torchrun_command(cfg, recipe, Path(dataset).resolve(), out, forked_workers()),
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
            report, said = relay_stderr(proc.stderr)
            code = proc.wait()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        if code != 0 and (out / PREEMPTED_FILE).is_file():  # a SIGTERM's checkpoint: not failed
            return PREEMPTED_EXIT
        error = out / ERROR_FILE
        for partial in out.glob(f"{ERROR_FILE}.*"):  # a rank killed while keeping its error
            partial.unlink(missing_ok=True)
        kept = error.read_text().strip() if code != 0 and error.is_file() else ""
        if kept:
            raise UserError(kept)
        if code != 0 and said is not None:  # the worker's user error, ERROR_FILE unwritable
            raise UserError(said)
        sys.stderr.write("".join(report))  # a real failure: torchrun's report is worth reading
        return code
