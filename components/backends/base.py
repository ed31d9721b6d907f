"""What a training backend is, and which one a recipe gets (`distributed.backend`).

Every backend starts the very same worker command (train/entry.py: `worker_args`) and returns
the worker's exit code: `local` runs torchrun on this machine, `pytorchjob` and `trainjob`
create the Kubeflow job that runs it in pods (torchrun there takes nodes, ranks and the
rendezvous from the PET_* variables the controller sets).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from ..config import RunConfig
    from .taskconfig import TaskConfig


class TrainingBackend(Protocol):
    name: str
    # whether dataset and output are paths on this machine (a cluster backend's are paths in
    # the pods, on the workspace volume)
    local: bool

    def launch(
        self,
        cfg: RunConfig,
        dataset: str,
        output: str,
        task: TaskConfig | None = None,
        job_name: str | None = None,
    ) -> int:
        """Train to completion (resuming from OUTPUT's checkpoints); the exit code. `task`:
        what a KFP train task passes through to the job; `job_name`: the job's name, the same
        on every retry (a cluster backend then adopts the job it created)."""
        ...


def training_backend(cfg: RunConfig) -> TrainingBackend:
    """The backend `distributed.backend` names (imported on demand: local needs no Kubernetes
    client, a cluster backend no torch)."""
    if cfg.distributed.backend == "local":
        from .local import LocalBackend

        return LocalBackend()
    from .kubernetes import KubernetesBackend, job_kind

    return KubernetesBackend(job_kind(cfg))
