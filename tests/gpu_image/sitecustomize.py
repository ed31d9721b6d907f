"""The device's bare CUDA PyTorch image, simulated for tests/test_gpu_check.py (which puts
this folder on PYTHONPATH): kubetune's own code (components, pipelines, tests, benchmarks) can
import a module only from a distribution that image has (benchmarks/gpu_image_packages.txt),
one whose wheel benchmarks/gpu_check.sh carries there (KUBETUNE_CARRIED, comma-separated), or
kubetune itself. A module of any other installed distribution is missing to it, for `import`
and importlib.util.find_spec alike, as it would be on the device. What those distributions
import in turn is theirs: gpu_check.sh carries the requirements of what it carries from their
metadata, and this environment's versions need not be the image's."""

import builtins
import importlib.abc
import importlib.metadata
import importlib.util
import os
import re
import sys
from pathlib import Path


def _name(dist: str) -> str:
    return re.sub(r"[-_.]+", "-", dist).lower()


_LIST = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_image_packages.txt"
_ALLOWED = {_name(line.split("#")[0].strip()) for line in _LIST.read_text().splitlines()}
_ALLOWED |= {_name(d) for d in os.environ.get("KUBETUNE_CARRIED", "").split(",") if d}
_ALLOWED |= {"kubetune", ""}
_OWNERS = importlib.metadata.packages_distributions()
_OURS = tuple(
    str(Path(__file__).resolve().parents[2] / part) + "/"
    for part in ("components", "pipelines", "tests", "benchmarks")
)


def _importer() -> str:
    """The file whose import statement (or importlib call) asked for the module."""
    frame = sys._getframe(1)
    while frame is not None and (
        "importlib" in frame.f_code.co_filename or frame.f_code.co_filename == __file__
    ):
        frame = frame.f_back
    return frame.f_code.co_filename if frame is not None else ""


class NotInTheImage(ModuleNotFoundError):
    pass


class _Image(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if _importer().startswith(_OURS):
            _refuse(name.partition(".")[0])
        return None


def _refuse(top: str) -> None:
    owners = _OWNERS.get(top)
    if owners and not any(_name(o) in _ALLOWED for o in owners):
        raise NotInTheImage(
            f"No module named {top!r}: the GPU image has no {owners[0]}, and "
            "benchmarks/gpu_check.sh carries no wheel of it",
            name=top,
        )


_import = builtins.__import__


def _image_import(name, globals=None, locals=None, fromlist=(), level=0):
    """Every import statement of our files, also of a module something else loaded already."""
    if level == 0 and str((globals or {}).get("__file__") or "").startswith(_OURS):
        _refuse(name.partition(".")[0])
    return _import(name, globals, locals, fromlist, level)


_find_spec = importlib.util.find_spec


def _image_find_spec(name, package=None):
    try:
        return _find_spec(name, package)
    except NotInTheImage:
        return None


builtins.__import__ = _image_import
importlib.util.find_spec = _image_find_spec
sys.meta_path.insert(0, _Image())
