"""The package as users install it: a wheel built from exactly what the images COPY, installed
non-editable into a fresh virtual environment from which the checkout cannot be imported, then
driven through its console script: help, compile of every shipped recipe (by name, so from the
package data), compare, render-job, render-serve, and an import of every module the compiled
pipelines' KFP components name. Fails when a package folder or a data file is missing."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from .conftest import REPO

pytestmark = pytest.mark.integration

# What the installed package runs, in the installed environment's own Python, from a folder
# outside the checkout. It prints one JSON line of what it found.
PROBE = r"""
import importlib, json, re, sys

import yaml
from pathlib import Path

import kubetune.components
from kubetune.components.config import load_recipe
from kubetune.pipelines.cli import main

venv, out, image_checks = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
assert Path(kubetune.components.__file__).resolve().is_relative_to(venv.resolve()), (
    kubetune.components.__file__
)
try:
    import components  # the checkout's top-level folder
except ModuleNotFoundError:
    checkout = False
else:
    checkout = components.__file__
recipes = sorted(p.stem for p in (Path(kubetune.pipelines.__file__).parent / "recipes").glob("*.yaml"))

def cli(*argv):
    code = main(list(argv))
    assert code == 0, (argv, code)

compiled = []
for name in recipes:
    cli("compile", name, "--output", str(out / f"{name}.yaml"))
    compiled.append(out / f"{name}.yaml")
    if load_recipe(name).stages:  # compare refuses a staged recipe (its stages compare themselves)
        continue
    cli("compare", name, "--methods", "lora,full", "--output", str(out / f"{name}-compare.yaml"))
    compiled.append(out / f"{name}-compare.yaml")
cli("compile", "falcon-7b-qlora", "--set", "serve.enabled=true", "--output", str(out / "serve.yaml"))
compiled.append(out / "serve.yaml")
for kind in ("pytorchjob", "trainjob", "runtime"):
    cli("render-job", "falcon-7b-qlora", "--kind", kind)
cli("render-serve", "falcon-7b-qlora", "--uri", "s3://models/falcon-7b")
def strings(node):
    if isinstance(node, dict):
        node = list(node.values())
    if isinstance(node, list):
        return [s for item in node for s in strings(item)]
    return [node] if isinstance(node, str) else []

sources = [s for p in compiled for doc in yaml.safe_load_all(p.read_text()) for s in strings(doc)]
bodies = sorted({m for s in sources for m in re.findall(r"from (kubetune\.[\w.]+) import", s)})
for module in bodies + image_checks:
    importlib.import_module(module)
print(json.dumps({"recipes": recipes, "bodies": bodies, "checkout": checkout}))
"""


def image_import_checks() -> list[str]:
    """The kubetune modules the Dockerfiles import to check their build."""
    found = []
    for dockerfile in sorted((REPO / "images").glob("*/Dockerfile")):
        for names in re.findall(r'python3? -c "import ([^"]+)"', dockerfile.read_text()):
            found += [n.strip() for n in names.split(",") if n.strip().startswith("kubetune.")]
    return found


def copied_sources(dockerfile: Path, into: Path) -> list[str]:
    """Copy what the Dockerfile's COPY lines take into /src, as they take it; their sources."""
    sources = []
    for line in dockerfile.read_text().splitlines():
        words = line.split()
        if words[:1] != ["COPY"] or not words[-1].startswith("/src"):
            continue
        dest = into / words[-1].removeprefix("/src").lstrip("/")
        for source in words[1:-1]:
            target = dest / Path(source).name if words[-1].endswith("/") else dest
            target.parent.mkdir(parents=True, exist_ok=True)
            if (REPO / source).is_dir():
                shutil.copytree(REPO / source, target, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy(REPO / source, target)
            sources.append(source)
    return sources


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built with this environment's setuptools from the trainer image's sources."""
    tmp = tmp_path_factory.mktemp("wheel")
    copied_sources(REPO / "images" / "trainer" / "Dockerfile", tmp / "src")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
         "--no-index", str(tmp / "src"), "--wheel-dir", str(tmp / "dist")],
        check=True,
    )  # fmt: skip
    (built,) = (tmp / "dist").glob("kubetune-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """A new virtual environment with the wheel installed (not editable). Its dependencies come
    from this environment's site-packages through a .pth line, which imports them but does not
    run their .pth files: the checkout's editable finder stays out."""
    venv = tmp_path_factory.mktemp("installed") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    ours = {sysconfig.get_paths()[key] for key in ("purelib", "platlib")}
    (Path(purelib) / "kubetune-test-deps.pth").write_text("\n".join(sorted(ours)) + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps",
         "--no-index", str(wheel)],
        check=True,
    )  # fmt: skip
    return venv


def test_the_wheel_holds_every_file_git_tracks_under_the_packages(wheel):
    tracked = subprocess.run(
        ["git", "ls-files", "components", "pipelines"],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    assert "components/serve/render.py" in tracked and "pipelines/recipes/tiny-demo.yaml" in tracked
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [path for path in tracked if f"kubetune/{path}" not in names]
    assert not missing, f"not in {wheel.name}: {missing}"
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]


def test_the_wheel_is_built_from_what_every_image_copies(tmp_path):
    needed = {"pyproject.toml", "setup.py", "README.md", "components", "pipelines"}
    for image in ("trainer", "steps", "eval"):
        copied = set(copied_sources(REPO / "images" / image / "Dockerfile", tmp_path / image))
        assert needed <= copied, (image, needed - copied)


def test_the_installed_package_runs_every_command_without_the_checkout(installed, tmp_path):
    bin_ = installed / "bin"
    env = {"PATH": f"{bin_}:/usr/bin:/bin", "HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    helped = subprocess.run(
        [bin_ / "kubetune", "--help"], capture_output=True, text=True, cwd=tmp_path, env=env
    )
    assert helped.returncode == 0, helped.stderr
    assert "render-serve" in helped.stdout and "compile" in helped.stdout

    (tmp_path / "out").mkdir()
    image_checks = image_import_checks()
    assert len(image_checks) >= 3, image_checks
    probe = subprocess.run(
        [bin_ / "python", "-c", PROBE, str(installed), str(tmp_path / "out"), *image_checks],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600,
    )  # fmt: skip
    assert probe.returncode == 0, probe.stderr[-3000:]
    found = json.loads(probe.stdout.strip().splitlines()[-1])
    assert found["checkout"] is False
    shipped = sorted(p.stem for p in (REPO / "pipelines" / "recipes").glob("*.yaml"))
    assert found["recipes"] == shipped
    # every step's KFP body, the deploy step's among them
    steps = {p.parent.name for p in (REPO / "components").glob("*/kfp_body.py")}
    named = {re.sub(r"^kubetune\.components\.(\w+)\.kfp_body$", r"\1", m) for m in found["bodies"]}
    assert steps <= named, steps - named
