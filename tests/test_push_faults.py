"""The faults a real bucket throws at a push, produced for real: an HTTP proxy in front of the S3
test server answers chosen requests with 503 SlowDown, 500 InternalError or 400 ExpiredToken,
slows uploads so that two pushes overlap, or drops conditional headers like a server without
them. Results are read back with boto3 and hashlib."""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from .conftest import KUBETUNE, TINY_DEMO, assert_user_error, run_cli
from .faulty_s3 import Fault, FaultyS3, parts, uploads
from .test_push import EXPECTED, bucket, make_model, read_bucket, sha

pytestmark = pytest.mark.integration

LOCK = ".kubetune-push.lock"


@pytest.fixture
def proxy(s3):
    faulty = FaultyS3(s3.url)
    yield faulty
    faulty.stop()


def env_via(s3, proxy) -> dict[str, str]:
    return {**s3.env(), "AWS_ENDPOINT_URL_S3": proxy.url}


def assert_holds(s3, name: str, prefix: str, src) -> dict:
    """The prefix holds exactly src's files and a manifest naming them, and no lease."""
    objects = read_bucket(s3, name, prefix)
    assert set(objects) == EXPECTED | {"manifest.json"}, sorted(objects)
    manifest = json.loads(objects["manifest.json"])
    for item in manifest["files"]:
        data = (src / item["path"]).read_bytes()
        assert objects[item["path"]] == data and item["sha256"] == sha(data)
    return manifest


def test_throttling_and_server_errors_mid_push_are_retried(s3, proxy, tmp_path):
    name = bucket(s3, "throttled")
    src = make_model(tmp_path / "model")
    slow = proxy.add(Fault("SlowDown", parts, times=2))
    broken = proxy.add(Fault("InternalError", uploads, times=2, after=1))
    dest = f"s3://{name}/run"
    result = run_cli("push", src, dest, "--part-size-mb", "5", env=env_via(s3, proxy))
    assert result.code == 0, result
    assert slow.injected == 2 and broken.injected == 2
    assert len(proxy.requests("PUT", 503)) == 2 and len(proxy.requests("PUT", 500)) == 2
    assert_holds(s3, name, "run/", src)


@pytest.mark.parametrize("what", ["lease", "part", "object", "manifest"])
def test_a_write_that_landed_but_whose_response_was_lost_is_not_mistaken(s3, proxy, tmp_path, what):
    """The request reached S3 and took effect; the answer never came back (500 after the
    commit). The client's retry then meets its own write: a conditional create of the lease or
    the manifest finds it already there. The push must recognize its own write and finish with
    one whole model, not call its own lease someone else's or stop."""
    name = bucket(s3, f"lost-{what}")
    src = make_model(tmp_path / "model")
    matches = {
        "lease": lambda m, p, q: m == "PUT" and p.endswith(LOCK),
        "part": parts,
        "object": lambda m, p, q: uploads(m, p, q) and "partNumber=" not in q,
        "manifest": lambda m, p, q: m == "PUT" and p.endswith("manifest.json"),
    }
    lost = proxy.add(Fault("InternalError", matches[what], times=1, landed=True))
    dest = f"s3://{name}/run"
    result = run_cli("push", src, dest, "--part-size-mb", "5", env=env_via(s3, proxy))
    assert lost.injected == 1
    assert result.code == 0, result
    assert_holds(s3, name, "run/", src)
    statuses = [s for p, _, s in proxy.requests("PUT") if matches[what]("PUT", p, "partNumber=1")]
    assert 500 in [s for _, _, s in proxy.requests("PUT")], statuses


def test_credentials_expire_half_way_then_the_rerun_sends_only_what_is_missing(s3, proxy, tmp_path):
    name = bucket(s3, "expiring")
    src = make_model(tmp_path / "model")  # 4 small files, then 3 parts of the big one
    proxy.add(Fault("ExpiredToken", uploads, times=None, after=5))
    dest = f"s3://{name}/run"
    args = ("push", src, dest, "--part-size-mb", "5", "--workers", "1")
    failed = run_cli(*args, env=env_via(s3, proxy))
    assert_user_error(failed, dest, "ExpiredToken")
    assert "manifest.json" not in read_bucket(s3, name, "run/")

    proxy.clear()
    again = run_cli(*args, env=env_via(s3, proxy))
    assert again.code == 0, again
    assert "pushed 1 file(s)" in again.out and "(4 already there)" in again.out
    sent = [q for p, q, _ in proxy.requests("PUT") if LOCK not in p and "manifest" not in p]
    assert len(sent) == 2 and all("partNumber=" in q for q in sent)  # parts 2 and 3 only
    assert_holds(s3, name, "run/", src)


def test_two_pushes_to_one_prefix_at_once_leave_one_whole_model(s3, proxy, tmp_path):
    name = bucket(s3, "racing")
    first = make_model(tmp_path / "a", seed=1)
    second = make_model(tmp_path / "b", seed=2)
    proxy.upload_delay = 1.0  # each push takes 7+ s: they overlap however late one starts
    dest = f"s3://{name}/shared"
    env = {**__import__("os").environ, **env_via(s3, proxy)}
    runs = [
        subprocess.Popen(
            [KUBETUNE, "push", str(src), dest, "--part-size-mb", "5", "--workers", "1"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for src in (first, second)
    ]
    outcomes = [(p.wait(timeout=300), p.stdout.read(), p.stderr.read()) for p in runs]
    codes = sorted(code for code, _, _ in outcomes)
    assert codes == [0, 2], outcomes
    loser = next(err for code, _, err in outcomes if code == 2)
    assert "another push is writing a different model here" in loser
    assert len(loser.strip().splitlines()) == 1
    winner = first if outcomes[0][0] == 0 else second
    assert_holds(s3, name, "shared/", winner)


def test_a_live_lease_is_respected_and_a_dead_one_taken_over(s3, tmp_path):
    name = bucket(s3, "leases")
    src = make_model(tmp_path / "model", big_mib=1)
    client = s3.client()
    held = {"owner": "x", "content": "another model", "host": "pod-7", "lease_s": 300}
    client.put_object(
        Bucket=name, Key=f"run/{LOCK}", Body=json.dumps({**held, "renewed": time.time()})
    )
    client.put_object(Bucket=name, Key="run/manifest.json", Body=b"{}")
    busy = run_cli("push", src, f"s3://{name}/run", env=s3.env())
    assert_user_error(busy, "another push is writing a different model here", "pod-7")
    assert set(read_bucket(s3, name, "run/")) == {LOCK, "manifest.json"}  # nothing changed

    client.put_object(Bucket=name, Key=f"run/{LOCK}", Body=json.dumps({**held, "renewed": 0}))
    taken = run_cli("push", src, f"s3://{name}/run", env=s3.env())
    assert taken.code == 0, taken
    assert_holds(s3, name, "run/", src)


def test_a_server_without_conditional_writes_is_detected(s3, proxy, tmp_path):
    name = bucket(s3, "plain")
    src = make_model(tmp_path / "model", big_mib=1)
    proxy.conditional = False
    result = run_cli("push", src, f"s3://{name}/run", env=env_via(s3, proxy))
    assert result.code == 0, result
    assert "ignores conditional writes" in result.err
    assert_holds(s3, name, "run/", src)


@pytest.mark.parametrize("sse, key", [("AES256", None), ("aws:kms", "alias/kubetune-models")])
def test_server_side_encryption_is_asked_for_on_every_object(s3, tmp_path, sse, key):
    name = bucket(s3, f"sse-{sse.replace(':', '-').lower()}")
    src = make_model(tmp_path / "model")
    dest = f"s3://{name}/run"
    recipe = ["--recipe", TINY_DEMO, "--set", f"output.uri={dest}", "--set", f"output.sse={sse}"]
    recipe += ["--set", f"output.sse_kms_key_id={key}"] if key else []
    result = run_cli("push", src, dest, "--part-size-mb", "5", *recipe, env=s3.env())
    assert result.code == 0, result
    client = s3.client()
    keys = [k for k in read_bucket(s3, name, "run/")]
    assert set(keys) == EXPECTED | {"manifest.json"}
    for k in keys:
        head = client.head_object(Bucket=name, Key=f"run/{k}")
        assert head.get("ServerSideEncryption") == sse, k
        if key:
            assert head.get("SSEKMSKeyId", "").endswith("kubetune-models"), k
    big = "run/model-00001-of-00001.safetensors"
    for n in (1, 2, 3):  # each part of the multipart upload
        head = client.head_object(Bucket=name, Key=big, PartNumber=n)
        assert head.get("ServerSideEncryption") == sse, n

    # an object stored unencrypted earlier is not taken as already there
    client.put_object(Bucket=name, Key="run/config.json", Body=(src / "config.json").read_bytes())
    again = run_cli("push", src, dest, "--part-size-mb", "5", *recipe, env=s3.env())
    assert again.code == 0 and "pushed 1 file(s)" in again.out, again
    assert client.head_object(Bucket=name, Key="run/config.json")["ServerSideEncryption"] == sse


def test_encryption_settings_are_checked(tmp_path):
    src = make_model(tmp_path / "model", big_mib=1)
    local = run_cli("push", src, tmp_path / "out", "--sse", "AES256")
    assert_user_error(local, "applies to s3:// only")
    lone_key = run_cli("push", src, "s3://b/x", "--sse-kms-key-id", "k")
    assert_user_error(lone_key, "--sse-kms-key-id is only used with --sse aws:kms")
    assert not (tmp_path / "out").exists()
