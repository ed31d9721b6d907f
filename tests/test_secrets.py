"""No secret in any output: with sentinel values in AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN and
HF_TOKEN, push/pull against the S3 test server, compile, render-job, submit to the loopback
KFP API and failing steps leave the sentinels in no log, report, manifest, metrics file,
compiled pipeline, rendered job, request or error message. (The main job, `run --local`, is
checked the same way in test_pipeline.py, with these sentinels.) Rendered jobs reference
Kubernetes Secrets by name only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from .conftest import TINY_DEMO, CliResult, run_cli
from .fake_kfp import FakeKfp
from .faulty_s3 import Fault, FaultyS3, uploads
from .test_push import make_model

pytestmark = pytest.mark.integration

SENTINELS = {
    "AWS_SECRET_ACCESS_KEY": "ktSENTINELawsSecret0a1b2c3d4e5f",
    "AWS_SESSION_TOKEN": "ktSENTINELsessionToken9z8y7x6w",
    "HF_TOKEN": "hf_ktSENTINELhubToken5q4r3s2t",
}


def leaks(text: str | bytes) -> list[str]:
    data = text.encode() if isinstance(text, str) else text
    return [name for name, value in SENTINELS.items() if value.encode() in data]


def assert_no_secret(results: list[CliResult], *folders: Path) -> int:
    """No sentinel in any command's stdout/stderr or in any file under folders; the number of
    files read (so a test can see it looked at something)."""
    for result in results:
        assert not leaks(result.out) and not leaks(result.err), result
    read = 0
    for folder in folders:
        for path in folder.rglob("*"):
            if path.is_file() and not path.is_symlink():
                assert not leaks(path.read_bytes()), path
                read += 1
    return read


def test_no_secret_in_any_output(s3, tmp_path):
    env = {**s3.env(), **SENTINELS}
    s3.client().create_bucket(Bucket="secrets")
    model = make_model(tmp_path / "model")
    work = tmp_path / "out"
    work.mkdir()
    results = []

    def run(*args, **kw) -> CliResult:
        result = run_cli(*args, env={**env, **kw.pop("env", {})}, **kw)
        results.append(result)
        return result

    dest = "s3://secrets/falcon/run-1"
    assert run("push", model, dest, "--part-size-mb", "5").code == 0
    assert run("pull", dest, work / "pulled").code == 0
    assert run("compile", TINY_DEMO, "--output", work / "pipeline.yaml").code == 0
    hf = ["--set", "kubernetes.hf_secret=hf-token"]
    job = run("render-job", "falcon-7b-qlora", *hf)
    assert job.code == 0
    (work / "job.yaml").write_text(job.out)
    serve = run("render-serve", "falcon-7b-qlora", "--uri", dest)
    assert serve.code == 0
    kfp = FakeKfp()
    try:
        assert run("submit", TINY_DEMO, "--host", kfp.url, "--experiment", "x").code == 0
    finally:
        kfp.close()
    for request in kfp.requests:
        assert not leaks(json.dumps(request, default=str)), request
    assert not leaks(b"".join(kfp.uploads))

    # failing steps: expired credentials half-way, a refused bucket whose name carries the
    # secret (the one-line error masks it), a train that stops on a user error
    proxy = FaultyS3(s3.url)
    proxy.add(Fault("ExpiredToken", uploads, times=None, after=2))
    try:
        expired = run("push", model, dest + "-2", env={"AWS_ENDPOINT_URL_S3": proxy.url})
    finally:
        proxy.stop()
    assert expired.code == 2 and "ExpiredToken" in expired.err
    named = run("push", model, f"s3://no-such-bucket/{SENTINELS['AWS_SECRET_ACCESS_KEY']}")
    assert named.code == 2 and "s3://no-such-bucket/***" in named.err, named
    bad = run("train", TINY_DEMO, "--dataset", work / "nothing", "--output", work / "train")
    assert bad.code == 2

    bucket = s3.client().list_objects_v2(Bucket="secrets")["Contents"]
    for obj in bucket:
        body = s3.client().get_object(Bucket="secrets", Key=obj["Key"])["Body"].read()
        assert not leaks(body), obj["Key"]
    assert assert_no_secret(results, work) > 5

    # the rendered jobs name the Secrets and carry no value
    docs = [d for d in yaml.safe_load_all(job.out) if d]
    env_vars = [
        e
        for d in docs
        for spec in d["spec"]["pytorchReplicaSpecs"].values()
        for c in spec["template"]["spec"]["containers"]
        for e in c.get("env", [])
    ]
    refs = [e["valueFrom"]["secretKeyRef"] for e in env_vars if "valueFrom" in e]
    assert {r["name"] for r in refs} == {"kubetune-s3", "hf-token"}
    assert all(set(r) <= {"name", "key", "optional"} for r in refs)
    for e in env_vars:
        if e["name"] in SENTINELS or e["name"] == "AWS_ACCESS_KEY_ID":
            assert "value" not in e and "secretKeyRef" in e["valueFrom"], e
