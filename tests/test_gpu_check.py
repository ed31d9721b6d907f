"""benchmarks/gpu_check.sh, checked on a CPU: its plan (--dry-run) names every step of the
GPU check; what it carries is exactly what a bare CUDA PyTorch image lacks for them (the worker,
the GPU tests and the benchmarks run here with only the image's distributions and the carried
ones importable: tests/gpu_image/); the carried wheels' own requirements are met; and the
wheels with the working tree fit the 64 MiB the device tool takes along."""

from __future__ import annotations

import email.parser
import os
import re
import subprocess
import sys
import zipfile

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from .conftest import REPO, TINY_DEMO, run_cli

pytestmark = pytest.mark.integration

SCRIPT = REPO / "benchmarks" / "gpu_check.sh"
MiB = 1024 * 1024
DEVICE = {  # the device's Python: 3.12 on x86-64 Linux
    "python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
    "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
    "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": "",
}  # fmt: skip


def name(dist: str) -> str:
    return re.sub(r"[-_.]+", "-", dist).lower()


def dry_run(env: dict | None = None) -> str:
    proc = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run"],
        capture_output=True, text=True, env={**os.environ, **(env or {})}, check=True,
    )  # fmt: skip
    return proc.stdout


def carried() -> dict[str, str]:
    """The plan's wheels: {name: version}."""
    text = dry_run().split("carry (what a bare CUDA PyTorch image lacks):\n")[1]
    pins = [line.strip() for line in text.splitlines() if line.startswith("  ")]
    return {name(p.split("==")[0]): p.split("==")[1] for p in pins}


def image() -> set[str]:
    lines = (REPO / "benchmarks" / "gpu_image_packages.txt").read_text().splitlines()
    return {name(line.split("#")[0].strip()) for line in lines if line.split("#")[0].strip()}


def image_env(without: str = "") -> dict[str, str]:
    """The environment of a process that sees only the GPU image and the carried wheels."""
    carry = [n for n in carried() if n != without]
    return {"PYTHONPATH": str(REPO / "tests" / "gpu_image"), "KUBETUNE_CARRIED": ",".join(carry)}


def test_the_plan_names_every_step_and_pins_every_wheel():
    plan = dry_run()
    steps = plan.split("carry")[0]
    assert "python3 -m pytest -m gpu" in steps
    runs = [line for line in steps.splitlines() if "benchmarks/train_throughput.py" in line]
    assert "--cases" not in runs[0]  # every case of the default list
    assert "--cases llama3-8b-8-layers-dpo-lora-r16" in runs[1]  # and the DPO case against TRL
    assert "fit_each_kubetune_side" in steps and "--add-run" in SCRIPT.read_text()
    assert "540 s in all" in steps  # 9 minutes
    pins = dict(
        line.split("==") for line in (REPO / "images" / "constraints.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    )  # fmt: skip
    pins = {name(k): v for k, v in pins.items()}
    wheels = carried()
    assert {"bitsandbytes", "liger-kernel", "datasets", "pydantic", "trl"} <= set(wheels)
    for dist, version in wheels.items():
        assert dist not in image(), f"{dist} is in the image already"
        if dist in pins:
            assert version == pins[dist], (dist, version, pins[dist])
    # the `gpu` extra installs the kernels the GPU tests need, so none skips for a package
    import tomllib

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    assert {name(Requirement(r).name) for r in extras["gpu"]} == {"bitsandbytes", "liger-kernel"}


def test_the_worker_and_the_gpu_tests_import_nothing_else_the_image_lacks(tmp_path, tiny_dataset):
    collect = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-n", "0", "-p",
         "no:cacheprovider", "tests/test_gpu.py"],
        cwd=REPO, capture_output=True, text=True, env={**os.environ, **image_env()},
    )  # fmt: skip
    assert collect.returncode == 0, collect.stdout + collect.stderr
    assert "NotInTheImage" not in collect.stdout + collect.stderr
    train = ["train", TINY_DEMO, "--dataset", tiny_dataset, "--set", "train.max_steps=1",
             "--set", "method=qlora"]  # fmt: skip
    ok = run_cli(*train, "--output", tmp_path / "ok", env=image_env())
    assert ok.code == 0, ok
    # the simulation bites: without a carried wheel the worker cannot start
    missing = run_cli(*train, "--output", tmp_path / "missing", env=image_env("datasets"))
    assert missing.code != 0 and "the GPU image has no datasets" in missing.err, missing


def test_the_wheels_fit_and_bring_what_they_require(tmp_path):
    wheels = tmp_path / "whl"
    fetched = subprocess.run(
        ["bash", str(SCRIPT), "--fetch-wheels"], cwd=REPO, capture_output=True, text=True,
        env={**os.environ, "GPU_CHECK_WHEELS": str(wheels)}, timeout=600,
    )  # fmt: skip
    if fetched.returncode != 0 and "No matching distribution" not in fetched.stderr:
        pytest.skip(f"no package index to fetch the wheels from: {fetched.stderr[-300:]}")
    assert fetched.returncode == 0, fetched.stderr
    files = sorted(wheels.glob("*.whl"))
    plan = carried()
    assert len(files) == len(plan)
    available = image() | set(plan)
    for wheel in files:
        with zipfile.ZipFile(wheel) as z:
            meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
            headers = email.parser.Parser().parsestr(z.read(meta).decode())
        assert plan[name(headers["Name"])] == headers["Version"]
        for text in headers.get_all("Requires-Dist") or []:
            req = Requirement(text)
            if req.marker and not req.marker.evaluate(DEVICE):
                continue
            assert name(req.name) in available, f"{wheel.name} requires {req}, not carried"
            if name(req.name) in plan:
                assert Version(plan[name(req.name)]) in req.specifier, (wheel.name, str(req))
    tree = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True)
    tree_bytes = sum((REPO / p).stat().st_size for p in tree.stdout.decode().split("\0") if p)
    wheel_bytes = sum(f.stat().st_size for f in files)
    assert tree_bytes + wheel_bytes < 64 * MiB, (tree_bytes / MiB, wheel_bytes / MiB)
    assert f"wheels: {wheel_bytes} bytes" in dry_run({"GPU_CHECK_WHEELS": str(wheels)})
