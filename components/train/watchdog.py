"""A rank that stops answering becomes one line on every other rank, never a silent hang.

The process group gets `distributed.timeout_minutes` (a gloo collective past it raises; NCCL's
own watchdog would abort the process with a C++ trace). Beside it every rank runs a `Watchdog`
thread that beats into the rendezvous store (torchrun's agent holds it, so it outlives a dead
worker) every few seconds with its step and what it is doing, and reads the run's abort key. When
this rank's step (or evaluation, or checkpoint) has made no progress for the timeout, it reads
every rank's beat and names the rank that did not arrive: one whose beat went stale (stopped,
hung or gone), else one still in an earlier step. It prints that line, leaves it for the
launcher (ERROR_FILE) and ends the process. A rank that stops on an error of its own (an
out-of-memory error, say) sets the abort key, and every other rank's watchdog ends its process
with that line within a beat, instead of waiting in a collective for the timeout.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from contextlib import suppress

# one namespace per attempt: torchrun's store outlives workers it restarts (elastic restarts)
PREFIX = f"kubetune/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
ABORT = PREFIX + "abort"


def beat_interval(timeout: float) -> float:
    return max(0.5, min(5.0, timeout / 6))


def default_store():
    import torch.distributed as dist

    with suppress(Exception):
        return dist.distributed_c10d._get_default_store()
    return None


class Watchdog(threading.Thread):
    """See the module docstring; `mark(step, doing)` is the main thread's progress."""

    def __init__(self, world, timeout_minutes: float, die: Callable[[str], None], store=None):
        super().__init__(daemon=True, name="kubetune-watchdog")
        self.rank, self.size = world.rank, world.size
        self.timeout = timeout_minutes * 60
        self.interval = beat_interval(self.timeout)
        self.store = store if store is not None else default_store()
        self.die = die
        self.step, self.doing, self.since = 0, "starting", time.monotonic()
        self.started = self.since
        self.halt = threading.Event()
        self.signalled: Callable[[], bool] = lambda: False  # a SIGTERM came (guard.py)

    def mark(self, step: int, doing: str) -> None:
        """The main thread moved on (one attribute write: no I/O on the training path)."""
        self.step, self.doing, self.since = step, doing, time.monotonic()

    def run(self) -> None:
        while not self.halt.wait(self.interval):
            if self.store is None:
                continue
            try:
                self.store.set(f"{PREFIX}beat/{self.rank}", f"{time.time()} {self.step}")
                if self.store.check([ABORT]):
                    self.die(self.store.get(ABORT).decode("utf-8", "replace"))
                    return
            except Exception:  # the store gone: the launcher is ending the run
                continue
            gone = self.gone() if self.signalled() else []
            if gone:  # told to stop, and a rank is gone: this step will never finish
                self.die(
                    f"SIGTERM in {self.doing} of step {self.step} while rank(s) "
                    f"{', '.join(map(str, gone))} are gone (no heartbeat): the step cannot "
                    "finish, so no checkpoint was saved; a rerun resumes from the last one"
                )
                return
            stalled = time.monotonic() - self.since
            if stalled > self.timeout:
                self.die(self.diagnose(stalled))
                return

    def stop(self) -> None:
        self.halt.set()

    def beats(self) -> dict[int, tuple[float, int]]:
        """Every rank's last beat: (seconds ago, its step)."""
        found = {}
        now = time.time()
        for rank in range(self.size):
            key = f"{PREFIX}beat/{rank}"
            with suppress(Exception):
                if self.store is not None and self.store.check([key]):
                    stamp, step = self.store.get(key).decode().split()
                    found[rank] = (now - float(stamp), int(step))
        return found

    def gone(self, beats: dict | None = None) -> list[int]:
        """The ranks whose heartbeat went stale (stopped, hung or gone) or never came."""
        beats = self.beats() if beats is None else beats
        stale = 2 * self.interval + 1
        missing = time.monotonic() - self.started > stale  # every rank had time to beat
        return [
            r
            for r in range(self.size)
            if (r not in beats and missing) or beats.get(r, (0,))[0] > stale
        ]

    def diagnose(self, stalled: float) -> str:
        """The line that names the step and the rank(s) that did not arrive."""
        beats = self.beats()
        gone = self.gone(beats)
        behind = [r for r, (_, step) in beats.items() if r not in gone and step < self.step]
        minutes = self.timeout / 60
        lead = (
            f"{self.doing} of step {self.step} made no progress on rank {self.rank} for "
            f"{stalled:.0f} s (distributed.timeout_minutes={minutes:g})"
        )
        if gone:
            detail = "; ".join(
                f"rank {r} did not arrive: "
                + (
                    f"no heartbeat for {beats[r][0]:.0f} s (stopped, hung or gone) in step "
                    f"{beats[r][1]}"
                    if r in beats
                    else "it never sent a heartbeat"
                )
                for r in gone
            )
        elif behind:
            detail = "; ".join(
                f"rank {r} did not arrive: it is alive but still in step {beats[r][1]}"
                for r in behind
            )
        else:
            detail = (
                "every rank is alive and in this step: a collective that none of them completes "
                "(the network between the nodes, or NCCL)"
            )
        return f"{lead}: {detail}"


def abort_others(message: str, store=None) -> None:
    """Tell every other rank's watchdog to end its process with `message` (best effort)."""
    store = store if store is not None else default_store()
    with suppress(Exception):
        if store is not None:
            store.set(ABORT, message)


def end_with(output, keep_error: Callable) -> Callable[[str], None]:
    """What a watchdog does when it fires: the line on stderr, in ERROR_FILE, then the end of
    this process (its main thread may be stuck in a collective that never returns)."""

    def die(message: str) -> None:
        from ..secrets import redact

        message = redact(message)
        print(f"error: {message}", file=sys.stderr, flush=True)
        keep_error(output, message)
        with suppress(Exception):
            sys.stdout.flush()
        os._exit(2)

    return die
