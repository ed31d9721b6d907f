"""torchrun with the worker forked from a process that has already imported it: the local
backend's launcher on a machine without CUDA.

`python -m torch.distributed.run ... -m kubetune.components.train.worker ARGS` starts a fresh
interpreter per worker, and each one imports torch, transformers' modeling code, peft and
datasets again: about 8 s of CPU a worker on a 2-core machine, longer than a tiny run's
training. This module takes torchrun's own arguments, imports the worker and what it imports
once, and hands torchrun's elastic launcher (the very same rendezvous, environment, restarts
and failure report) the worker's `main` as a function entrypoint with the `fork` start method,
so every worker starts with those modules loaded. A worker's exit status is its `main`'s, as
with the module entrypoint.

Forking is safe only before CUDA is initialised, so the local backend uses this only where
torch sees no CUDA device; with GPUs it runs torchrun with the worker module as before.
"""

from __future__ import annotations

import logging
import sys

PRELOAD = ("peft", "datasets", "transformers.modeling_utils")  # what every worker imports


def run_worker(module: str, *argv: str) -> None:
    """A forked worker: the module entrypoint's `sys.exit(main())` as a function, that prints
    its own traceback as an interpreter would (torch's function wrapper only hands it to the
    launcher's log)."""
    import importlib
    import traceback

    main = importlib.import_module(module).main
    try:
        code = main(list(argv))
    except Exception:
        traceback.print_exc()
        sys.stderr.flush()
        raise
    if code:
        sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    import importlib

    from torch.distributed.launcher.api import elastic_launch
    from torch.distributed.run import config_from_args, get_args_parser

    args = get_args_parser().parse_args(argv)
    if not args.module:
        raise SystemExit("forked_launch: give the worker as a module (-m)")
    config, _, _ = config_from_args(args)
    config.start_method = "fork"
    # A failed function entrypoint is logged with the worker's traceback again; the worker has
    # printed it (or its one-line user error), and the launcher's failure report follows.
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").setLevel(logging.CRITICAL)
    for name in (args.training_script, *PRELOAD):
        importlib.import_module(name)
    launch = elastic_launch(config=config, entrypoint=run_worker)
    launch(args.training_script, *args.training_script_args)


if __name__ == "__main__":
    main()
