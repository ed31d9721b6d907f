"""Registering a pushed model in Kubeflow Model Registry: `kubetune push --recipe` (what the
pipeline's push step does) against the S3 server on loopback and a loopback Model Registry that
answers the REST paths the `model-registry` client calls (tests/registry_server.py); what was
registered is read back with the client itself and from S3 with boto3."""

from __future__ import annotations

import json

import pytest

from .conftest import TINY_DEMO, assert_user_error, run_cli
from .registry_server import RegistryServer
from .s3server import S3Server
from .test_push import make_model, read_bucket

pytestmark = pytest.mark.integration

EVALUATION = {
    "tuned": {"eval_loss": 1.5, "rougeL": 0.42},
    "baseline": {"eval_loss": 2.5, "rougeL": 0.1},
    "gate": {"passed": True, "min_rouge_l": 0.2},
    "lm_eval": {"tasks": [{"task": "arc_easy", "metric": "acc", "base": 0.75, "tuned": 0.5}]},
}


@pytest.fixture
def servers(tmp_path):
    s3, registry = S3Server(), RegistryServer()
    token = tmp_path / "sa-token"
    token.write_text("kfp-sa-token")
    env = {**s3.env(), "KF_PIPELINES_SA_TOKEN_PATH": str(token)}
    yield s3, registry, env
    registry.close()
    s3.stop()


def push(tmp_path, registry, env, dest, *extra):
    src = tmp_path / "model"
    if not src.exists():
        make_model(src, big_mib=1)
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps(EVALUATION))
    sets = [
        f"output.model_registry={json.dumps({'server': registry.url, 'model_name': 'falcon-chat', 'author': 'ml-platform'})}",
        f"output.uri={dest}",
    ]
    args = [a for s in sets for a in ("--set", s)]
    return run_cli(
        "push", src, dest, "--metrics", metrics, "--recipe", TINY_DEMO, *args, *extra, env=env
    )


def test_push_registers_model_version_and_artifact(servers, tmp_path):
    s3, registry, env = servers
    s3.client().create_bucket(Bucket="reg")
    dest = "s3://reg/falcon-chat/run-7"
    result = push(tmp_path, registry, env, dest, "--version", "run-7")
    assert result.code == 0, result

    from model_registry import ModelRegistry

    client = ModelRegistry(registry.url, author="reader", user_token="t")
    model = client.get_registered_model("falcon-chat")
    version = client.get_model_version("falcon-chat", "run-7")
    artifact = client.get_model_artifact("falcon-chat", "run-7")
    assert model.owner == "ml-platform" and version.author == "ml-platform"
    assert artifact.uri == dest and artifact.model_format_name == "huggingface"
    props = version.custom_properties
    assert props["tuned_rougeL"] == 0.42 and props["baseline_eval_loss"] == 2.5
    assert props["gate_passed"] is True
    assert props["lm_eval_arc_easy_base"] == 0.75 and props["lm_eval_arc_easy_tuned"] == 0.5
    # the manifest, written after the registration, records it
    manifest = json.loads(read_bucket(s3, "reg", "falcon-chat/run-7/")["manifest.json"])
    assert manifest["registry"] == {
        "registered": True,
        "server": registry.url,
        "model": "falcon-chat",
        "model_id": model.id,
        "version": "run-7",
        "version_id": version.id,
        "artifact_id": artifact.id,
    }
    # the push authenticated with the pipeline's ServiceAccount token (then the reader's)
    assert registry.tokens == {"Bearer kfp-sa-token", "Bearer t"}

    # a second run adds a version to the same model; the same version again is refused
    dest2 = "s3://reg/falcon-chat/run-8"
    assert push(tmp_path, registry, env, dest2, "--version", "run-8").code == 0
    assert len(registry.of_kind("RegisteredModel")) == 1
    assert len(registry.of_kind("ModelVersion")) == 2
    again = push(tmp_path, registry, env, "s3://reg/falcon-chat/again", "--version", "run-8")
    assert_user_error(again, "already has a version run-8", "nothing was pushed")
    assert read_bucket(s3, "reg", "falcon-chat/again/") == {}  # refused before any upload


def test_a_registry_that_is_down_fails_after_the_push(servers, tmp_path):
    s3, registry, env = servers
    s3.client().create_bucket(Bucket="down")
    registry.down = True
    dest = "s3://down/falcon-chat/run-9"
    result = push(tmp_path, registry, env, dest, "--version", "run-9")
    assert_user_error(
        result,
        f"the Model Registry at {registry.url}",
        f"The model is pushed to {dest}",
        "says it is not registered",
    )
    objects = read_bucket(s3, "down", "falcon-chat/run-9/")
    manifest = json.loads(objects["manifest.json"])
    assert manifest["registry"]["registered"] is False and "503" in manifest["registry"]["error"]
    assert {f["path"] for f in manifest["files"]} <= set(objects)  # the model is whole


def test_registry_settings_are_checked(tmp_path):
    bad = run_cli(
        "config",
        TINY_DEMO,
        "--set",
        'output.model_registry={"server": "registry:8080", "model_name": "m", "author": "a"}',
    )
    assert_user_error(bad, "output.model_registry.server must be http(s)://HOST[:PORT]")
    make_model(tmp_path / "m", big_mib=1)
    no_version = run_cli(
        "push",
        tmp_path / "m",
        tmp_path / "out",
        "--recipe",
        TINY_DEMO,
        "--set",
        'output.model_registry={"server": "http://r:8080", "model_name": "m", "author": "a"}',
    )
    assert_user_error(no_version, "--version")


def test_a_push_without_a_token_is_refused_by_the_registry_and_says_so(servers, tmp_path):
    """A deployed registry sits behind an authorizing proxy: no token, no registration. The
    model is still pushed whole, and manifest.json records the refusal."""
    s3, registry, env = servers
    s3.client().create_bucket(Bucket="anon")
    env = {k: v for k, v in env.items() if k != "KF_PIPELINES_SA_TOKEN_PATH"}
    dest = "s3://anon/falcon-chat/run-3"
    result = push(tmp_path, registry, env, dest, "--version", "run-3")
    assert_user_error(result, f"the Model Registry at {registry.url}", "says it is not registered")
    assert registry.objects == {} and registry.tokens <= {None, ""}
    manifest = json.loads(read_bucket(s3, "anon", "falcon-chat/run-3/")["manifest.json"])
    assert manifest["registry"]["registered"] is False and "401" in manifest["registry"]["error"]
    # a token the registry does not accept is refused the same way
    registry.valid_tokens = {"another-token"}
    dest = "s3://anon/falcon-chat/run-4"
    result = push(tmp_path, registry, servers[2], dest, "--version", "run-4")
    assert_user_error(result, "says it is not registered")
    assert registry.objects == {}


def test_the_registry_refuses_a_version_of_a_model_that_does_not_exist(servers):
    """The fake answers as the registry does: a version needs its registered model."""
    from model_registry import ModelRegistry
    from model_registry.types import ModelVersion

    _, registry, _ = servers
    client = ModelRegistry(registry.url, author="reader", user_token="t")
    orphan = client._api.upsert_model_version(ModelVersion(name="v1", author="reader"), "9999")
    with pytest.raises(Exception, match="(?i)not found|404|RegisteredModel") as refused:
        client.async_runner(orphan)
    assert registry.of_kind("ModelVersion") == [], refused.value
