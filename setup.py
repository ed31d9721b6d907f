"""kubetune's package layout, found on disk rather than listed (pyproject.toml holds the rest).

The repository keeps components/ and pipelines/ at its top; they install as kubetune.components
and kubetune.pipelines (kubetune itself is a namespace package with no folder of its own), so
nothing generic lands in site-packages. Every folder under them is a package (those without an
__init__.py, such as recipes/ and data/, are namespace packages, as setuptools' own discovery
would have them) and every file in it that is not a module is its package data: a new folder or
data file cannot be left out of the wheel. tests/test_wheel.py builds the wheel and checks that
it holds every file git tracks there.
"""

from __future__ import annotations

from pathlib import Path

from setuptools import setup

ROOTS = {"kubetune.components": "components", "kubetune.pipelines": "pipelines"}
NOT_SHIPPED = {"__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache"}


def layout() -> tuple[list[str], dict[str, list[str]]]:
    """(packages, package_data) under ROOTS."""
    packages: list[str] = []
    data: dict[str, list[str]] = {}
    for name, folder in ROOTS.items():
        root = Path(__file__).parent / folder
        for path in sorted([root, *root.rglob("*")]):
            parts = path.relative_to(root).parts
            if NOT_SHIPPED & set(parts) or not path.is_dir():
                continue
            package = ".".join([name, *parts])
            packages.append(package)
            files = [f.name for f in sorted(path.iterdir()) if f.is_file()]
            data[package] = [f for f in files if not f.endswith((".py", ".pyc"))]
    return packages, data


packages, package_data = layout()
setup(package_dir=ROOTS, packages=packages, package_data=package_data)
