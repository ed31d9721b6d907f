"""How every step writes its output: into a hidden staging folder (or file) beside it, renamed
into place only when complete, so nobody ever sees a half-written output that looks finished;
an existing output is replaced only when asked.

Storage faults (a full disk, a quota, a file-size limit, a read-only or unwritable path, a
parent folder that is not there) end in one `UserError` that names the output and the cause,
and the staging copy is removed, so the disk holds nothing that looks complete.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import UserError

# The errors a disk, a mount or a permission throws, and what to tell the user.
STORAGE_CAUSES = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "the disk quota is used up",
    errno.EFBIG: "the file is larger than the file-size limit (ulimit -f)",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOENT: "no such file or folder",
    errno.ENOTDIR: "a part of the path is not a folder",
    errno.EISDIR: "it is a folder",
    errno.EIO: "an I/O error from the device",
}
WRITE_FAULTS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)
# safetensors' Rust writer reports `... (os error 28)` in a SafetensorError; shutil.copytree
# collects `[Errno 28] ...` texts in a shutil.Error
_OS_ERROR = re.compile(r"os error (\d+)|\[Errno (\d+)\]")


def storage_errno(exc: BaseException) -> int | None:
    """The errno of a storage fault (see STORAGE_CAUSES), or None when `exc` is not one."""
    code = exc.errno if isinstance(exc, OSError) else None
    if code is None and isinstance(exc, OSError) or type(exc).__name__ == "SafetensorError":
        found = _OS_ERROR.search(str(exc))  # shutil.Error is an OSError without an errno
        code = int(found.group(1) or found.group(2)) if found else None
    return code if code in STORAGE_CAUSES else None


def storage_cause(exc: BaseException) -> str | None:
    """What a storage fault was, in words, or None when `exc` is not one."""
    code = storage_errno(exc)
    return STORAGE_CAUSES[code] if code is not None else None


def storage_error(path: Path | str, exc: BaseException) -> UserError:
    """A one-line error naming `path` (and the file inside it that failed, when known)."""
    cause = storage_cause(exc)
    detail = getattr(exc, "filename", None)
    inside = f" at {detail}" if detail and str(detail) != str(path) else ""
    return UserError(f"{path}: cannot write ({cause}{inside})")


@contextmanager
def disk_errors(path: Path | str) -> Iterator[None]:
    """Turn a storage fault inside the block into a UserError naming `path`."""
    try:
        yield
    except Exception as exc:
        if storage_cause(exc) is None:
            raise
        raise storage_error(path, exc) from None


def check_parent(output: Path) -> None:
    """The output's parent folder must be there: an output under a volume that is not mounted
    would otherwise be written to the container's own disk and vanish with the pod."""
    parent = output.absolute().parent
    if not parent.exists():
        raise UserError(f"{output}: its parent folder {parent} does not exist (create it first)")
    if not parent.is_dir():
        raise UserError(f"{output}: {parent} is not a folder")


def run_folder(run_dir: str | Path) -> Path:
    """A pipeline run's own folder (WORKSPACE/runs/RUN, or a method's under it): the pipeline
    lays it out, so it is created here; the steps' outputs inside it must then have a parent."""
    folder = Path(run_dir)
    with disk_errors(folder):
        folder.mkdir(parents=True, exist_ok=True)
    return folder


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def check_writable(output: Path) -> None:
    """The output's parent folder is there and takes a file: checked before the step's work, so
    a read-only or unwritable path fails in a second, not after an hour of merging."""
    check_parent(output)
    with disk_errors(output):
        fd, probe = tempfile.mkstemp(prefix=f".{output.name}.probe-", dir=output.absolute().parent)
        os.close(fd)
        os.unlink(probe)


def _refuse_finished(output: Path, overwrite: bool) -> None:
    if output.exists() and not overwrite and not _is_empty_dir(output):
        raise UserError(f"{output} already exists; pass --overwrite to replace it")


def check_output(output: Path, overwrite: bool) -> None:
    """Refuse to replace a finished output unless asked (an empty folder, as KFP makes, is
    fine), and an output that cannot be written (see check_writable)."""
    _refuse_finished(output, overwrite)
    check_writable(output)


def _publish(staging: Path, output: Path, overwrite: bool) -> None:
    """Rename the finished folder into place; an old output is moved aside first and removed
    after, so a failure never leaves neither. (The staging folder beside it was just written:
    the parent takes files, only a finished output appearing meanwhile is checked again.)"""
    _refuse_finished(output, overwrite)
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
    as `output`. Whatever happens, no staging folder is left behind; a storage fault inside the
    block is one UserError naming `output`."""
    check_parent(output)
    staging = None
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
        yield staging
        _publish(staging, output, overwrite)
    except Exception as exc:
        cause = storage_cause(exc)
        if cause is None:
            raise
        # a full disk, a quota, a size limit or a read-only file system are the output's; a
        # missing or unreadable file outside the staging folder is an input's
        names = [getattr(exc, "filename", None), getattr(exc, "filename2", None)]
        paths = [str(n) for n in names if n]
        if (
            getattr(exc, "errno", None) not in WRITE_FAULTS
            and staging is not None
            and paths
            and not any(p.startswith(str(staging)) for p in paths)
        ):
            raise UserError(f"{paths[0]}: {cause}") from None  # an input, not the output
        raise storage_error(output, exc) from None
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)


@contextmanager
def staged_file(output: Path) -> Iterator[Path]:
    """Yield a temporary path beside `output` to write the whole file to; when the block ends
    without an error it is flushed to disk and renamed to `output`, else removed."""
    check_parent(output)
    if output.is_dir():
        raise UserError(f"{output}: is a folder, not a file")
    tmp = None
    try:
        with disk_errors(output):
            fd, name = tempfile.mkstemp(
                prefix=f".{output.stem}.partial-", suffix=output.suffix, dir=output.parent
            )
            os.close(fd)
            tmp = Path(name)
            yield tmp
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, output)
            tmp = None
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


def write_file(output: Path, data: str | bytes) -> None:
    """Write a whole file atomically (see staged_file)."""
    with staged_file(output) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
