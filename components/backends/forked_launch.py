"""torchrun with the worker forked from a process that has already imported it: the local
backend's launcher on a machine without CUDA.

`python -m torch.distributed.run ... -m kubetune.components.train.worker ARGS` starts a fresh
interpreter per worker, and each one imports torch, transformers' modeling code, peft and
datasets again: about 8 s of CPU a worker on a 2-core machine, longer than a tiny run's
training. This module takes torchrun's own arguments and hands torchrun's elastic launcher (the
very same rendezvous, environment, restarts and failure report) the worker's `main` as a
function entrypoint with the `forkserver` start method: one fresh interpreter imports the worker
and what it imports once, and every worker is forked from it with those modules loaded. A
worker's exit status is its `main`'s, as with the module entrypoint.

Not `fork` from the launcher itself: by the time the agent starts its workers it runs the
rendezvous store's libuv thread (and jemalloc's background thread), and a child forked from a
threaded process can inherit a lock another thread held at that instant. The fork server is
started before any of those threads exist and runs none of its own (Python 3.14 makes it the
default start method on Linux for this reason).

The fork server preloads forkserver_exit first: when the launcher has gone, it leaves without
tearing its modules down (seconds, while it held the stderr the CLI relays).

Forking is safe only before CUDA is initialised, so the local backend uses this only where
torch sees no CUDA device; with GPUs it runs torchrun with the worker module as before.
"""

from __future__ import annotations

import logging
import multiprocessing
import sys

PRELOAD = ("peft", "datasets", "transformers.modeling_utils")  # what every worker imports
# first, so that the fork server leaves without tearing those down (forkserver_exit.py)
EXIT_FAST = "kubetune.components.backends.forkserver_exit"


def run_worker(module: str, *argv: str) -> None:
    """A forked worker: the module entrypoint's `sys.exit(main())` as a function, that prints
    its own traceback as an interpreter would (torch's function wrapper only hands it to the
    launcher's log)."""
    import importlib
    import traceback

    # A fork server's child inherits `forkserver` as its default start method; the worker's own
    # subprocesses (DataLoader workers) take the interpreter's default, as under torchrun:
    # otherwise each DataLoader starts a fork server of its own that imports torch afresh.
    multiprocessing.set_start_method(None, force=True)
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
    import multiprocessing.forkserver

    module = _module_argument(sys.argv[1:] if argv is None else argv)
    # The fork server imports the worker while this process imports torch's launcher and meets
    # the other ranks: started first, so the two overlap.
    preload = [EXIT_FAST, module, *PRELOAD] if module else [EXIT_FAST, *PRELOAD]
    multiprocessing.get_context("forkserver").set_forkserver_preload(preload)
    multiprocessing.forkserver.ensure_running()

    from torch.distributed.launcher.api import elastic_launch
    from torch.distributed.run import config_from_args, get_args_parser

    args = get_args_parser().parse_args(argv)
    if not args.module:
        raise SystemExit("forked_launch: give the worker as a module (-m)")
    config, _, _ = config_from_args(args)
    config.start_method = "forkserver"
    # A failed function entrypoint is logged with the worker's traceback again; the worker has
    # printed it (or its one-line user error), and the launcher's failure report follows.
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").setLevel(logging.CRITICAL)
    # each worker re-runs only this small module as its __main__ (multiprocessing's
    # preparation), where `run_worker` is found; the fork server has imported the rest
    launch = elastic_launch(config=config, entrypoint=run_worker)
    launch(args.training_script, *args.training_script_args)


def _module_argument(argv: list[str]) -> str | None:
    """The worker module of torchrun's arguments (`-m MODULE`, before the worker's own)."""
    for n, arg in enumerate(argv[:-1]):
        if arg in ("-m", "--module"):
            return argv[n + 1]
    return None


if __name__ == "__main__":
    main()
