"""The local launcher's fork server leaves as soon as its launcher has gone (forked_launch.py).

The fork server preloads torch, transformers, peft and datasets, and when the launcher exits it
ends with a SystemExit. An interpreter's normal finalization then tears those modules down,
which takes 1.5-3.5 s on a 2-core machine. All that time the server holds the launcher's stderr
open, and the CLI relays stderr until it closes, so every local `kubetune train` waited for it.
Its forked workers exit with os._exit and run no atexit handler, so they never do this.

Imported first among the fork server's preloads, so its handler runs last of its atexit
handlers: it flushes the server's output and calls os._exit(0). Nothing waits for the server's
status. Imported anywhere else, it does nothing.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
from types import FrameType


def _leave() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # closed or gone: nothing left to say
            stream.flush()
    os._exit(0)


def in_fork_server() -> bool:
    """This import runs inside multiprocessing's fork server (its `main` preloading us)."""
    from multiprocessing import forkserver

    frame: FrameType | None = sys._getframe()
    while frame is not None:
        if frame.f_code is forkserver.main.__code__:
            return True
        frame = frame.f_back
    return False


if in_fork_server():
    atexit.register(_leave)
