"""A cluster job whose rank 0 stops printing: `kubernetes.stall_minutes` without a line of its
log while the job runs (queued or suspended time does not count) is reported as stalled, once,
with the last line it printed; with `kubernetes.delete_stalled` the job is deleted and the step
fails with that line. The worker's own watchdog (train/watchdog.py) ends a run whose ranks stop
answering each other; this catches what it cannot: a pod stuck as a whole (a hung filesystem,
a lost node, a deadlocked process)."""

from __future__ import annotations

import math
import time

from ..errors import UserError


class Stalled(UserError):
    """A stalled job that kubernetes.delete_stalled says to delete."""


class Stall:
    def __init__(self, where: str, minutes: float | None, delete: bool, follower):
        self.where, self.delete, self.follower = where, delete, follower
        self.limit = None if minutes is None else minutes * 60
        self.reported = False

    def check(self, running: bool) -> None:
        """Called on every look at the job; `running`: admitted and not suspended."""
        if self.limit is None or self.follower is None:
            return
        if not running:
            self.follower.touch()  # the clock starts again when the job runs again
            return
        quiet = time.monotonic() - self.follower.last_line
        if quiet <= self.limit:
            if self.reported:
                print(f"{self.where}: moving again", flush=True)
            self.reported = False
            return
        if self.reported:
            return
        self.reported = True
        last = self.follower.last_text
        line = (
            f"{self.where} stalled: rank 0 printed nothing for {quiet / 60:.1f} min "
            f"(kubernetes.stall_minutes={self.limit / 60:g})"
            + (f"; its last line: {last!r}" if last else "; it printed nothing yet")
        )
        if self.delete:
            raise Stalled(f"{line}. It was deleted (kubernetes.delete_stalled)")
        print(f"{line}. Still watching it (kubernetes.delete_stalled deletes a stalled job)")

    def left(self) -> int | None:
        """Seconds until the job would count as stalled (the watch wakes up for it)."""
        if self.limit is None or self.follower is None or self.reported:
            return None
        due = self.follower.last_line + self.limit - time.monotonic()
        return max(1, math.ceil(due))
