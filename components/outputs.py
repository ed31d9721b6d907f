"""How every step writes its output folder: into a hidden staging folder beside it, renamed into
place only when complete, so nobody ever sees a half-written output that looks finished; an
existing output is replaced only when asked."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import UserError


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def check_output(output: Path, overwrite: bool) -> None:
    """Refuse to replace a finished output unless asked (an empty folder, as KFP makes, is fine)."""
    if output.exists() and not overwrite and not _is_empty_dir(output):
        raise UserError(f"{output} already exists; pass --overwrite to replace it")


def _publish(staging: Path, output: Path, overwrite: bool) -> None:
    """Rename the finished folder into place; an old output is moved aside first and removed
    after, so a failure never leaves neither."""
    check_output(output, overwrite)
    old = None
    if _is_empty_dir(output):
        output.rmdir()
    elif output.exists():
        old = output.with_name(f".{output.name}.old-{os.getpid()}")
        output.rename(old)
    staging.rename(output)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def staged_output(output: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a staging folder beside `output`; when the block ends without an error, publish it
    as `output`. Whatever happens, no staging folder is left behind."""
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
    try:
        yield staging
        _publish(staging, output, overwrite)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
