"""The one exception type that means "the user gave us something wrong".

The CLI turns it into exit code 2 and its message, with no traceback. Everything else is a bug
and may traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad config, bad data, a missing file or missing credentials: say what and where."""


def where(path: object, line: int | None = None, row: int | None = None) -> str:
    """`file:line` / `file: row N` prefix for error messages."""
    if line is not None:
        return f"{path}:{line}"
    if row is not None:
        return f"{path}: row {row}"
    return str(path)
