"""The local backend's launcher without CUDA (components/backends/forked_launch.py): torchrun's
elastic launcher with the worker forked from a process that imported it. Checked against
torchrun itself on a stand-in worker (tests/env_worker.py): the same distributed environment
per rank, and a refusing or crashing worker fails the launch as it does under torchrun, its
traceback shown."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from kubetune.components.backends.local import free_port

from .conftest import REPO

pytestmark = pytest.mark.integration


def launch(launcher: str, out, action: str) -> subprocess.CompletedProcess:
    out.mkdir()
    command = [
        sys.executable, "-m", launcher, "--nnodes", "1", "--nproc-per-node", "2",
        "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
        "-m", "tests.env_worker", str(out), action,
    ]  # fmt: skip
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)


def ranks(out) -> dict[int, dict]:
    return {n: json.loads((out / f"rank-{n}.json").read_text()) for n in (0, 1)}


FORKED, TORCHRUN = "kubetune.components.backends.forked_launch", "torch.distributed.run"


def test_forked_workers_get_torchruns_environment(tmp_path):
    forked = launch(FORKED, tmp_path / "forked", "ok")
    plain = launch(TORCHRUN, tmp_path / "torchrun", "ok")
    assert forked.returncode == 0 and plain.returncode == 0, (forked.stderr, plain.stderr)
    theirs, ours = ranks(tmp_path / "torchrun"), ranks(tmp_path / "forked")
    for n in (0, 1):
        expected = {**theirs[n]["env"], "MASTER_PORT": None}
        assert {**ours[n]["env"], "MASTER_PORT": None} == expected
        assert ours[n]["env"]["RANK"] == str(n) and ours[n]["env"]["WORLD_SIZE"] == "2"
        assert ours[n]["argv"] == [str(tmp_path / "forked"), "ok"]


def test_a_worker_that_refuses_fails_the_launch(tmp_path):
    result = launch(FORKED, tmp_path / "out", "refuse")
    assert result.returncode != 0
    assert "rank 0 ran" in result.stderr and "rank 1 ran" in result.stderr


def test_a_crashing_worker_shows_its_traceback_and_fails_the_launch(tmp_path):
    forked = launch(FORKED, tmp_path / "forked", "crash")
    plain = launch(TORCHRUN, tmp_path / "torchrun", "crash")
    for result in (forked, plain):
        assert result.returncode != 0
        assert "Traceback (most recent call last)" in result.stderr
        assert 'raise RuntimeError("a bug in rank 1")' in result.stderr, result.stderr


FORK_SERVER = """
import multiprocessing, multiprocessing.forkserver as server, sys
multiprocessing.get_context("forkserver").set_forkserver_preload(sys.argv[1:])
server.ensure_running()
print(server._forkserver._forkserver_pid)
"""


@pytest.mark.parametrize("exit_fast", [True, False])
def test_the_fork_server_leaves_without_tearing_its_modules_down(tmp_path, exit_fast):
    """With forkserver_exit preloaded first, the fork server runs the atexit handlers of what it
    preloaded after it and then leaves, without the module teardown that kept the CLI waiting
    on its stderr; without it, the teardown runs (the finalizer's mark)."""
    import os
    import time

    preload = ["tests.atexit_marker"]
    if exit_fast:
        preload.insert(0, "kubetune.components.backends.forkserver_exit")
    env = {**os.environ, "MARKER_DIR": str(tmp_path)}
    started = subprocess.run(
        [sys.executable, "-c", FORK_SERVER, *preload],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert started.returncode == 0, started.stderr
    pid = int(started.stdout.split()[-1])
    deadline = time.monotonic() + 120  # its launcher has gone: the server follows
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"fork server {pid} still running")
    assert (tmp_path / "atexit").read_text() == "ran"
    assert (tmp_path / "finalized").exists() is not exit_fast


def test_forkserver_exit_changes_nothing_outside_a_fork_server():
    code = (
        "import sys, kubetune.components.backends.forkserver_exit as fast\n"
        "assert not fast.in_fork_server()\n"
        "sys.exit(3)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
    assert result.returncode == 3, result.stderr


def test_the_launcher_is_chosen_by_cuda_unless_the_environment_says(monkeypatch):
    import torch

    from kubetune.components.backends.local import forked_workers
    from kubetune.components.errors import UserError

    monkeypatch.delenv("KUBETUNE_LOCAL_LAUNCHER", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert forked_workers() is False  # with CUDA: a fresh interpreter per worker, as in a pod
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert forked_workers() is True
    monkeypatch.setenv("KUBETUNE_LOCAL_LAUNCHER", "torchrun")
    assert forked_workers() is False
    monkeypatch.setenv("KUBETUNE_LOCAL_LAUNCHER", "spawn")
    with pytest.raises(UserError, match="KUBETUNE_LOCAL_LAUNCHER=spawn: forked or torchrun"):
        forked_workers()
