"""Progress bars on a terminal; plain log lines (no bars) in a pod or a CI log."""

from __future__ import annotations

import sys


def quiet_progress_off_terminal() -> None:
    if sys.stderr.isatty():
        return
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
