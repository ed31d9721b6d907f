"""How the training worker is started and how it hands back a user error: what every backend
(local torchrun, PyTorchJob, TrainJob) needs of the worker, without loading it (or torch)."""

from __future__ import annotations

WORKER_MODULE = "kubetune.components.train.worker"  # what torchrun starts, here or in a pod
ERROR_FILE = ".worker-error"  # in --output: a worker's UserError, for the launcher to show


def worker_args(recipe: str, dataset: str, output: str) -> list[str]:
    """The worker's own arguments after torchrun's (`recipe`: a path, or env:NAME)."""
    return ["-m", WORKER_MODULE, "--recipe", recipe, "--dataset", dataset, "--output", output]


PREEMPTED_FILE = ".worker-preempted"  # in --output: rank 0's line after a SIGTERM's checkpoint
PREEMPTED_EXIT = 143  # 128 + SIGTERM: what a preempted worker exits with (retryable, not failed)
