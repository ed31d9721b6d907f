"""`kubetune push` / `kubetune pull` against a real S3 endpoint (moto_server on loopback, boto3 over
HTTP), through a proxy that can cut the connection; results read back with boto3 and hashlib."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from .conftest import assert_user_error, run_cli
from .s3server import free_port
from .tcpproxy import FlakyProxy

pytestmark = pytest.mark.integration

MiB = 1024 * 1024
BUCKET = "models"


def bucket(s3, name: str) -> str:
    s3.client().create_bucket(Bucket=name)
    return name


def write_safetensors(path: Path, payload: bytes) -> None:
    """A valid safetensors file holding `payload` as one uint8 tensor (push refuses damaged
    ones, see model_files.py)."""
    header = json.dumps(
        {"w": {"dtype": "U8", "shape": [len(payload)], "data_offsets": [0, len(payload)]}}
    )
    raw = header.encode() + b" " * (-len(header) % 8)
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + payload)


def make_model(folder: Path, big_mib: int = 12, seed: int = 0) -> Path:
    """A model-shaped folder: one file over the part size, small ones, a nested one, and the
    things push leaves out (hidden files, checkpoints/)."""
    rng = __import__("numpy").random.default_rng(seed)
    folder.mkdir(parents=True)
    write_safetensors(folder / "model-00001-of-00001.safetensors", rng.bytes(big_mib * MiB + 12345))
    (folder / "config.json").write_text(json.dumps({"model_type": "falcon", "seed": seed}))
    (folder / "tokenizer.json").write_text(json.dumps({"vocab": list(range(100))}))
    (folder / "empty.txt").write_bytes(b"")
    (folder / "tensorboard").mkdir()
    (folder / "tensorboard" / "events.out").write_bytes(rng.bytes(3000))
    (folder / ".worker-error").write_text("hidden")
    (folder / "checkpoints" / "step-10").mkdir(parents=True)
    (folder / "checkpoints" / "step-10" / "state.safetensors").write_bytes(b"x" * 100)
    return folder


EXPECTED = {
    "model-00001-of-00001.safetensors",
    "config.json",
    "tokenizer.json",
    "empty.txt",
    "tensorboard/events.out",
}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_bucket(s3, name: str, prefix: str) -> dict[str, bytes]:
    client = s3.client()
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=name, Prefix=prefix):
        for obj in page.get("Contents", []):
            key = obj["Key"]
            out[key[len(prefix) :]] = client.get_object(Bucket=name, Key=key)["Body"].read()
    return out


FIPS = {"PYTHONPATH": str(Path(__file__).parent / "fips")}  # a FIPS-mode host's hashlib


def test_the_fips_simulation_refuses_md5_for_security():
    check = "import hashlib; hashlib.md5(usedforsecurity=False); hashlib.md5(b'x')"
    proc = subprocess.run(
        [sys.executable, "-c", check], env={**os.environ, **FIPS}, capture_output=True, text=True
    )
    assert proc.returncode == 1 and "disabled for FIPS" in proc.stderr, proc.stderr


def test_push_to_s3_then_pull(s3, tmp_path):
    """On a FIPS-mode host: S3's Content-MD5 and ETags are MD5, computed not for security."""
    name = bucket(s3, "push-pull")
    src = make_model(tmp_path / "model")
    dest = f"s3://{name}/falcon/run-1"
    env = {**s3.env(), **FIPS}
    result = run_cli("push", src, dest, "--part-size-mb", "5", env=env)
    assert result.code == 0, result
    assert "pushed 5 file(s)" in result.out

    objects = read_bucket(s3, name, "falcon/run-1/")
    assert set(objects) == EXPECTED | {"manifest.json"}
    manifest = json.loads(objects["manifest.json"])
    listed = {f["path"]: f for f in manifest["files"]}
    assert set(listed) == EXPECTED
    for path, item in listed.items():  # what S3 holds, hashed here, equals the source and manifest
        data = (src / path).read_bytes()
        assert objects[path] == data
        assert item == {"path": path, "size": len(data), "sha256": sha(data)}
    assert manifest["total_bytes"] == sum(len((src / p).read_bytes()) for p in EXPECTED)
    assert manifest["format"] == "kubetune.manifest/v1" and manifest["created"]
    head = s3.client().head_object(Bucket=name, Key="falcon/run-1/model-00001-of-00001.safetensors")
    assert head["ETag"].strip('"').endswith("-3")  # 12 MiB in 5 MiB parts: a multipart upload
    assert head["Metadata"]["sha256"] == listed["model-00001-of-00001.safetensors"]["sha256"]

    again = run_cli("push", src, dest, "--part-size-mb", "5", env=env)
    assert again.code == 0, again
    assert "pushed 0 file(s), 0 bytes (5 already there)" in again.out

    out = tmp_path / "pulled"
    pulled = run_cli("pull", dest, out, env=env)
    assert pulled.code == 0, pulled
    assert {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} == EXPECTED | {
        "manifest.json"
    }
    for path in EXPECTED:
        assert (out / path).read_bytes() == (src / path).read_bytes()


def test_connection_cut_mid_multipart_then_resume(s3, tmp_path):
    name = bucket(s3, "cut")
    src = make_model(tmp_path / "model", big_mib=16, seed=1)
    proxy = FlakyProxy(s3.port, cut_after=8 * MiB)  # part 1 arrives, part 2 is cut off
    env = {**s3.env(), "AWS_ENDPOINT_URL_S3": proxy.url, "AWS_MAX_ATTEMPTS": "2"}
    try:
        first = run_cli(
            "push", src, f"s3://{name}/m", "--part-size-mb", "5", "--workers", "1", env=env
        )
        assert_user_error(first, f"s3://{name}/m")
        assert "connection" in first.err.lower() or "reach" in first.err, first
        client = s3.client()
        keys = {o["Key"] for o in client.list_objects_v2(Bucket=name).get("Contents", [])}
        assert "m/manifest.json" not in keys  # the push failed: no manifest claims anything
        assert "m/model-00001-of-00001.safetensors" not in keys
        uploads = client.list_multipart_uploads(Bucket=name).get("Uploads", [])
        assert [u["Key"] for u in uploads] == ["m/model-00001-of-00001.safetensors"]
        parts = client.list_parts(
            Bucket=name, Key=uploads[0]["Key"], UploadId=uploads[0]["UploadId"]
        )
        assert len(parts.get("Parts", [])) >= 1

        proxy.heal()
        before = proxy.sent
        second = run_cli("push", src, f"s3://{name}/m", "--part-size-mb", "5", env=env)
        assert second.code == 0, second
        # the parts that made it are reused: less than the whole big file goes over the wire
        assert proxy.sent - before < (16 * MiB + 12345)
    finally:
        proxy.close()
    assert client.list_multipart_uploads(Bucket=name).get("Uploads", []) == []
    objects = read_bucket(s3, name, "m/")
    for path in EXPECTED:
        assert objects[path] == (src / path).read_bytes()
    assert {f["path"] for f in json.loads(objects["manifest.json"])["files"]} == EXPECTED


def test_manifest_never_names_a_missing_or_stale_object(s3, tmp_path):
    """Watch the bucket while a second, different model is pushed over the first: every time
    manifest.json is seen (the same one before and after the check), each object it lists is
    there with that size and checksum."""
    name = bucket(s3, "watched")
    first = make_model(tmp_path / "v1", big_mib=12, seed=2)
    second = make_model(tmp_path / "v2", big_mib=12, seed=3)
    assert run_cli("push", first, f"s3://{name}/m", "--part-size-mb", "5", env=s3.env()).code == 0
    proxy = FlakyProxy(s3.port, delay=0.002)  # slow uploads, so the watcher sees every phase
    env = {**s3.env(), "AWS_ENDPOINT_URL_S3": proxy.url}
    client = s3.client()
    checked, violations, stop = [], [], threading.Event()

    def manifest_etag():
        try:
            return client.head_object(Bucket=name, Key="m/manifest.json")["ETag"]
        except client.exceptions.ClientError:
            return None

    def watch():
        while not stop.is_set():
            etag = manifest_etag()
            if etag is None:
                checked.append("absent")
                continue
            try:
                body = client.get_object(Bucket=name, Key="m/manifest.json", IfMatch=etag)
            except client.exceptions.ClientError:
                continue
            manifest = json.loads(body["Body"].read())
            problems = []
            for item in manifest["files"]:
                try:
                    head = client.head_object(Bucket=name, Key=f"m/{item['path']}")
                except client.exceptions.ClientError:
                    problems.append(f"{item['path']} missing")
                    continue
                if (
                    head["ContentLength"] != item["size"]
                    or head["Metadata"].get("sha256") != item["sha256"]
                ):
                    problems.append(f"{item['path']} differs")
            if manifest_etag() == etag:  # the manifest did not change while we looked
                checked.append("present")
                violations.extend(problems)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        result = run_cli("push", second, f"s3://{name}/m", "--part-size-mb", "5", env=env)
    finally:
        stop.set()
        watcher.join()
        proxy.close()
    assert result.code == 0, result
    assert violations == []
    assert "absent" in checked and "present" in checked  # it saw the push in progress
    manifest = json.loads(read_bucket(s3, name, "m/")["manifest.json"])
    assert {f["path"]: f["sha256"] for f in manifest["files"]} == {
        p: sha((second / p).read_bytes()) for p in EXPECTED
    }


def test_push_errors_are_clear(s3, tmp_path):
    src = make_model(tmp_path / "model", big_mib=1)
    missing = run_cli("push", src, "s3://no-such-bucket/x", env=s3.env())
    assert_user_error(missing, "s3://no-such-bucket/x", "bucket does not exist")

    closed = free_port()
    env = {**s3.env(), "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{closed}", "AWS_MAX_ATTEMPTS": "1"}
    unreachable = run_cli("push", src, f"s3://{BUCKET}/x", env=env)
    assert_user_error(unreachable, "cannot reach the S3 endpoint")

    no_dir = run_cli("push", tmp_path / "nope", f"s3://{BUCKET}/x", env=s3.env())
    assert_user_error(no_dir, "no such folder")
    small = run_cli("push", src, tmp_path / "out", "--part-size-mb", "1")
    assert_user_error(small, "part size must be at least 5 MiB")
    assert not (tmp_path / "out").exists()


def test_wrong_credentials(tmp_path):
    """moto with authentication on: an unknown access key is refused, exit 2, nothing written."""
    port = free_port()
    binary = Path(sys.executable).parent / "moto_server"
    proc = subprocess.Popen(
        [str(binary), "-H", "127.0.0.1", "-p", str(port)],
        env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        env = {
            "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}",
            "AWS_ACCESS_KEY_ID": "AKIAWRONGWRONGWRONG1",
            "AWS_SECRET_ACCESS_KEY": "wrong",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        src = make_model(tmp_path / "model", big_mib=1)
        deadline = time.monotonic() + 30
        while True:
            result = run_cli("push", src, "s3://models/x", env=env)
            if "cannot reach" not in result.err or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert_user_error(result, "S3 rejected the credentials (InvalidAccessKeyId)")
        pulled = run_cli("pull", "s3://models/x", tmp_path / "p", env=env)
        assert_user_error(pulled, "S3 rejected the credentials")
        assert not (tmp_path / "p").exists()
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_pull_refuses_incomplete_or_corrupt(s3, tmp_path):
    name = bucket(s3, "pulls")
    src = make_model(tmp_path / "model", big_mib=1, seed=4)
    client = s3.client()
    client.put_object(Bucket=name, Key="half/config.json", Body=b"{}")
    nothing = run_cli("pull", f"s3://{name}/half", tmp_path / "a", env=s3.env())
    assert_user_error(nothing, "no manifest.json", "did not finish")
    assert not (tmp_path / "a").exists()

    assert run_cli("push", src, f"s3://{name}/ok", env=s3.env()).code == 0
    client.put_object(Bucket=name, Key="ok/tokenizer.json", Body=b"tampered")
    corrupt = run_cli("pull", f"s3://{name}/ok", tmp_path / "b", env=s3.env())
    assert_user_error(corrupt, "tokenizer.json: does not match manifest.json")
    assert not (tmp_path / "b").exists()
    assert not list(tmp_path.glob(".b.partial-*"))

    client.delete_object(Bucket=name, Key="ok/config.json")
    gone = run_cli("pull", f"s3://{name}/ok", tmp_path / "c", env=s3.env())
    assert_user_error(gone, "config.json: listed in manifest.json but missing")

    # the re-push repairs both objects; the pull then succeeds
    assert run_cli("push", src, f"s3://{name}/ok", env=s3.env()).code == 0
    assert run_cli("pull", f"s3://{name}/ok", tmp_path / "c", env=s3.env()).code == 0
    assert (tmp_path / "c" / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()


def test_push_and_pull_local_folder(tmp_path):
    src = make_model(tmp_path / "model", big_mib=1, seed=5)
    dest = tmp_path / "store" / "m"
    missing = run_cli("push", src, dest)  # like every output: the parent folder must be there
    assert_user_error(missing, str(dest), "parent folder", "does not exist")
    (tmp_path / "store").mkdir()
    assert run_cli("push", src, dest).code == 0
    assert {p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()} == EXPECTED | {
        "manifest.json"
    }
    (dest / "config.json").write_text("changed")  # a damaged copy is replaced on the next push
    again = run_cli("push", src, dest)
    assert "pushed 1 file(s)" in again.out, again
    assert (dest / "config.json").read_bytes() == (src / "config.json").read_bytes()
    out = tmp_path / "pulled"
    assert run_cli("pull", dest, out).code == 0
    assert (out / "model-00001-of-00001.safetensors").read_bytes() == (
        src / "model-00001-of-00001.safetensors"
    ).read_bytes()
    exists = run_cli("pull", dest, out)
    assert_user_error(exists, "already exists; pass --overwrite")
