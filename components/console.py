"""Progress bars on a terminal; plain log lines (no bars) in a pod or a CI log."""

from __future__ import annotations

import sys


def quiet_progress_off_terminal() -> None:
    """No tqdm bars from datasets, transformers and the hub in a pod or a CI log. Environment
    variables for what is not imported yet (importing them here would cost every CLI command
    a second), their own switches for what is."""
    if sys.stderr.isatty():
        return
    import os

    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers reads it too
    if "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()
    if "transformers" in sys.modules:
        sys.modules["transformers"].utils.logging.disable_progress_bar()


def duration(seconds: float, seconds_unit: str = "s") -> str:
    """45s, 12m30s or 3h05m (`seconds_unit` " s" spells the first 45 s)."""
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}{seconds_unit}"


class Progress:
    """Rows read, tokens and rows/s while a step streams data: one line redrawn in place on a
    terminal, a plain line every `every` seconds (and one at the end) in a pod or a CI log."""

    def __init__(self, label: str, stream=None, every: float | None = None):
        import time

        self.label, self.stream = label, stream or sys.stderr
        self.tty = self.stream.isatty()
        self.every = every if every is not None else (0.5 if self.tty else 10.0)
        self.clock = time.monotonic
        self.began = self.last = self.clock()

    def _line(self, rows: int, tokens: int) -> str:
        rate = rows / max(self.clock() - self.began, 1e-9)
        return f"{self.label}: {rows:,} rows read, {tokens:,} tokens, {rate:,.0f} rows/s"

    def update(self, rows: int, tokens: int) -> None:
        if self.clock() - self.last < self.every:
            return
        self.last = self.clock()
        end = "\r" if self.tty else "\n"
        print(self._line(rows, tokens), end=end, file=self.stream, flush=True)

    def done(self, rows: int, tokens: int) -> None:
        print(self._line(rows, tokens), file=self.stream, flush=True)
