"""The pieces of the training fault handling without a run: the spike guard's z-score, NaN in
metrics.json, a checkpoint's checksums, the watchdog's diagnosis, the pods' grace period and the
launcher's stall clock (the runs themselves: test_train_faults.py)."""

from __future__ import annotations

import json
import math
import statistics
import time
from types import SimpleNamespace

import pytest
import yaml

from kubetune.components.artifacts import write_json
from kubetune.components.config import load_recipe
from kubetune.components.train import checkpoint as ckpt
from kubetune.components.train.guard import Guard
from kubetune.components.train.watchdog import Watchdog

from .conftest import TINY_DEMO, assert_user_error, run_cli, run_cli_here

WORLD = SimpleNamespace(rank=0, size=3, main=True)


def test_a_spike_is_judged_against_the_window_before_it():
    cfg = load_recipe(TINY_DEMO, ["train.spike_guard.window=5", "train.spike_guard.z=3"])
    guard = Guard(cfg, WORLD, [], install=False)
    calm = [2.0, 2.1, 1.9, 2.05, 1.95]
    assert not any(guard.spike(s, loss) for s, loss in enumerate(calm, 1))
    mean, spread = statistics.fmean(calm), statistics.pstdev(calm)
    assert not guard.spike(6, mean + 2.9 * spread)  # under z: and it joins the window
    window = [*calm[1:], mean + 2.9 * spread]
    high = statistics.fmean(window) + 3.1 * statistics.pstdev(window)
    assert guard.spike(7, high)
    assert guard.recent == window, "a spike does not join the window it is judged by"
    assert not guard.spike(8, math.nan)
    off = Guard(load_recipe(TINY_DEMO, []), WORLD, [], install=False)
    assert not any(off.spike(s, 100.0 * s) for s in range(1, 60))


def test_metrics_json_never_holds_nan(tmp_path):
    write_json(tmp_path / "m.json", {"loss": [[1, float("nan")], [2, 1.5]], "x": float("inf")})
    text = (tmp_path / "m.json").read_text()
    assert json.loads(text) == {"loss": [[1, None], [2, 1.5]], "x": None}
    assert "NaN" not in text and "Infinity" not in text


def test_verify_names_the_file_that_does_not_match(tmp_path):
    folder = tmp_path / "step-0000004"
    folder.mkdir()
    files = {name: f"{name} bytes".encode() for name in [*ckpt.rank_files(0), ckpt.STATE]}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    (folder / ckpt.SUMS).write_text("".join(f"{ckpt.sha256_of(folder / n)}  {n}\n" for n in files))
    assert ckpt.verify(folder, 0) is None
    (folder / "rank-00000.json").write_bytes(b"rank-00000.json bytez")
    assert "rank-00000.json does not match its SHA-256" in ckpt.verify(folder, 0)
    (folder / "rank-00000.json").unlink()
    assert ckpt.verify(folder, 0) == "rank-00000.json is missing"
    assert "not in SHA256SUMS" in ckpt.verify(folder, 1)
    (folder / ckpt.SUMS).unlink()
    assert ckpt.verify(folder, 0) is None  # from before checksums: taken as it is


class DictStore:
    def __init__(self):
        self.data: dict[str, bytes] = {}

    def set(self, key, value):
        self.data[key] = value.encode() if isinstance(value, str) else value

    def check(self, keys):
        return all(k in self.data for k in keys)

    def get(self, key):
        return self.data[key]


def beat(store, dog, rank, age, step):
    from kubetune.components.train.watchdog import PREFIX

    store.set(f"{PREFIX}beat/{rank}", f"{time.time() - age} {step}")


def test_the_watchdog_names_the_rank_that_did_not_arrive():
    store = DictStore()
    dog = Watchdog(WORLD, 0.1, die=lambda m: None, store=store)  # 6 s: beats every 1 s
    dog.mark(7, "training")
    beat(store, dog, 0, 0.2, 7)
    beat(store, dog, 1, 30, 6)
    beat(store, dog, 2, 0.5, 7)
    line = dog.diagnose(6.5)
    assert line.startswith("training of step 7 made no progress on rank 0 for 6 s")
    assert "(distributed.timeout_minutes=0.1)" in line
    assert "rank 1 did not arrive: no heartbeat for 30 s (stopped, hung or gone) in step 6" in line
    beat(store, dog, 1, 0.1, 6)  # alive, but behind
    assert "rank 1 did not arrive: it is alive but still in step 6" in dog.diagnose(7)
    beat(store, dog, 1, 0.1, 7)
    assert "every rank is alive and in this step" in dog.diagnose(7)


def test_the_watchdog_thread_fires_on_its_own_and_on_an_abort():
    said = []
    store = DictStore()
    dog = Watchdog(WORLD, 0.02, die=said.append, store=store)  # 1.2 s, beats every 0.5 s
    dog.mark(3, "the checkpoint")
    dog.start()
    dog.join(10)
    assert said and said[0].startswith("the checkpoint of step 3 made no progress")
    from kubetune.components.train.watchdog import abort_others

    said.clear()
    dog = Watchdog(WORLD, 0.05, die=said.append, store=store)  # the abort, seen at the 1st beat
    abort_others("step 2: rank 1 ran out of GPU memory", store)
    dog.start()
    dog.join(10)
    assert said == ["step 2: rank 1 ran out of GPU memory"]


def render(*sets):
    result = run_cli_here("render-job", TINY_DEMO, *[a for s in sets for a in ("--set", s)])
    assert result.code == 0, result
    return yaml.safe_load(result.out)


@pytest.mark.integration
def test_pods_get_a_grace_period_for_their_checkpoint_and_torchrun_waits_for_it():
    from kubetune.components.planner.grace import MARGIN_SECONDS, step_and_save_seconds

    job = render()
    spec = job["spec"]["pytorchReplicaSpecs"]["Master"]
    pod = spec["template"]["spec"]
    step, save = step_and_save_seconds(load_recipe(TINY_DEMO, []))
    assert pod["terminationGracePeriodSeconds"] == math.ceil(2 * (step + save) + MARGIN_SECONDS)
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    grace = pod["terminationGracePeriodSeconds"]
    assert 0 < int(env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"]) < grace
    fixed = render("kubernetes.termination_grace_seconds=900")
    assert (
        fixed["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"][
            "terminationGracePeriodSeconds"
        ]
        == 900
    )
    trainjob = render("distributed.backend=trainjob", "kubernetes.termination_grace_seconds=900")
    (patch,) = trainjob["spec"]["runtimePatches"]
    node = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    assert node["template"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 900
    bad = run_cli("render-job", TINY_DEMO, "--set", "kubernetes.termination_grace_seconds=soon")
    assert_user_error(
        bad, "kubernetes.termination_grace_seconds must be a whole number > 0 or auto"
    )


@pytest.mark.parametrize(
    "sets,fragment",
    [
        (("distributed.strategy=deepspeed", "train.nonfinite=skip"), "need ddp or fsdp"),
        (("train.nonfinite=maybe",), "train.nonfinite"),
        (("train.keep_checkpoints=0",), "train.keep_checkpoints"),
        (("distributed.timeout_minutes=0",), "distributed.timeout_minutes"),
        (("train.spike_guard.window=2",), "train.spike_guard.window"),
    ],
)
def test_bad_fault_settings_are_one_line(sets, fragment):
    result = run_cli_here("plan", TINY_DEMO, *[a for s in sets for a in ("--set", s)])
    assert_user_error(result, fragment)


def test_the_stall_clock_runs_only_while_the_job_runs(capsys):
    from kubetune.components.backends.stall import Stall, Stalled

    follower = SimpleNamespace(last_line=time.monotonic() - 100, last_text="step 9/10 loss 1.0")
    follower.touch = lambda: setattr(follower, "last_line", time.monotonic())
    stall = Stall("PyTorchJob ns/x", 1.0, False, follower)
    stall.check(running=True)
    stall.check(running=True)  # said once
    assert capsys.readouterr().out.count("stalled: rank 0 printed nothing for 1.7 min") == 1
    stall.check(running=False)  # suspended by Kueue: the clock starts again
    assert stall.left() is None or stall.left() > 55
    stall = Stall("PyTorchJob ns/x", 1.0, True, follower)
    follower.last_line -= 120
    with pytest.raises(Stalled, match="It was deleted"):
        stall.check(running=True)
