"""Shared fixtures: a private model cache, the real CLI as a subprocess, data-file writers, and
the integration tier's expensive ones, once per session: a prepared dataset, a trained adapter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

# Tiny models are built once per test session into a private cache, never into ~/.cache.
os.environ.setdefault("KUBETUNE_CACHE", tempfile.mkdtemp(prefix="kubetune-test-cache-"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent
RECIPES = REPO / "pipelines" / "recipes"
TINY_DEMO = RECIPES / "tiny-demo.yaml"
KUBETUNE = str(Path(sys.executable).parent / "kubetune")


class CliResult:
    def __init__(self, proc: subprocess.CompletedProcess):
        self.code, self.out, self.err = proc.returncode, proc.stdout, proc.stderr

    def __repr__(self) -> str:
        return f"exit {self.code}\nstdout:\n{self.out}\nstderr:\n{self.err}"


def run_cli(*args: str, env: dict | None = None, cwd: Path | None = None) -> CliResult:
    """Run the installed `kubetune` console script, as a user would."""
    proc = subprocess.run(
        [KUBETUNE, *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        cwd=cwd,
        timeout=600,
    )
    return CliResult(proc)


def run_cli_here(*args: str, env: dict | None = None, cwd: Path | None = None) -> CliResult:
    """The CLI's `main()` in this test process, with its output captured: what the console
    script runs, without the seconds an interpreter takes to start and import (for the many
    checks that end before any work). An exception main() lets through is what the console
    script would print as a traceback, so it comes back as one, with exit status 1."""
    import contextlib
    import io
    import traceback

    from kubetune.pipelines.cli import main

    out, err = io.StringIO(), io.StringIO()
    saved_env, saved_cwd = dict(os.environ), os.getcwd()
    os.environ.update(env or {})
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main([str(a) for a in args])
            except SystemExit as exc:  # argparse's usage errors
                code = exc.code if isinstance(exc.code, int) else 1
            except Exception:
                traceback.print_exc()
                code = 1
    finally:
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
    return CliResult(subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue()))


def run_prepare(out: Path, *sets: str, env: dict | None = None) -> CliResult:
    """`kubetune prepare tiny-demo.yaml --output OUT --set ...` for each KEY=VALUE in sets."""
    overrides = [arg for item in sets for arg in ("--set", item)]
    return run_cli("prepare", TINY_DEMO, "--output", out, *overrides, env=env)


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture(scope="module")
def s3():
    """The S3 test server (moto on loopback), one per test module."""
    from .s3server import S3Server

    server = S3Server()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """The tiny demo's sample data, prepared once per session (per worker under xdist). Read it,
    never write into it."""
    out = tmp_path_factory.mktemp("tiny-dataset") / "dataset"
    result = run_prepare(out)
    assert result.code == 0, result
    return out


@pytest.fixture(scope="session")
def tiny_adapter(tiny_dataset, tmp_path_factory) -> Path:
    """A LoRA adapter of the tiny demo trained on tiny_dataset for 24 steps by two torchrun
    workers, once per session. Read it, never write into it."""
    out = tmp_path_factory.mktemp("tiny-adapter") / "adapter"
    result = run_cli(
        "train",
        TINY_DEMO,
        "--dataset",
        tiny_dataset,
        "--output",
        out,
        "--set",
        "train.max_steps=24",
    )
    assert result.code == 0, result
    return out


def write_jsonl(path: Path, rows: list, crlf_lines: bool = False) -> Path:
    sep = "\r\n" if crlf_lines else "\n"
    path.write_text(sep.join(json.dumps(r) for r in rows) + sep, encoding="utf-8", newline="")
    return path


def write_json(path: Path, rows) -> Path:
    path.write_text(json.dumps(rows, indent=1), encoding="utf-8")
    return path


def alpaca_rows(n: int) -> list[dict]:
    return [
        {
            "instruction": f"Add {i} and {i + 1}.",
            "input": "" if i % 2 else f"numbers {i}",
            "output": f"The sum is {2 * i + 1}.",
        }
        for i in range(n)
    ]


def dolly_rows(n: int) -> list[dict]:
    return [
        {
            "instruction": f"Name the day after day {i}.",
            "context": "Days of the week." if i % 3 else "",
            "response": f"Day {i + 1} comes after day {i}.",
            "category": "open_qa",
        }
        for i in range(n)
    ]


def samsum_rows(n: int) -> list[dict]:
    return [
        {
            "id": str(i),
            "dialogue": f"Anna: Lunch at {i} pm?\r\nTom: Yes, see you at {i} pm.",
            "summary": f"Anna and Tom meet for lunch at {i} pm.",
        }
        for i in range(n)
    ]


def assert_user_error(result: CliResult, *fragments: str) -> None:
    """Exit code 2, each fragment in stderr, and no traceback."""
    assert result.code == 2, result
    assert "Traceback" not in result.err and "Traceback" not in result.out, result
    for fragment in fragments:
        assert fragment in result.err, result
