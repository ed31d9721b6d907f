"""The fetch-model step: an s3:// model downloaded once per revision into WORKSPACE/models and
read from there by every later step (moto_server on loopback, boto3 over HTTP)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kubetune.components.errors import UserError
from kubetune.components.fetch_model.step import RECORD, slug, wanted_files
from kubetune.components.models import resolve_model

from .conftest import TINY_DEMO, assert_user_error, run_cli
from .fake_hub import FakeHub
from .s3server import S3Server, s3_env_for

PREFIX = "/models/tiny-falcon/"


def upload_model(server: S3Server, prefix: str, extra: dict[str, bytes]) -> dict[str, int]:
    """tiny://falcon's files (and `extra`) under s3://models/PREFIX; their sizes by path."""
    client = server.client()
    if "models" not in [b["Name"] for b in client.list_buckets()["Buckets"]]:
        client.create_bucket(Bucket="models")
    source = Path(resolve_model("tiny://falcon"))
    sizes = {}
    for f in sorted(source.rglob("*")):
        if f.is_file():
            rel = str(f.relative_to(source))
            client.upload_file(str(f), "models", f"{prefix}/{rel}")
            sizes[rel] = f.stat().st_size
    for rel, body in extra.items():
        client.put_object(Bucket="models", Key=f"{prefix}/{rel}", Body=body)
    return sizes


@pytest.fixture
def s3(tmp_path):
    server = S3Server(log=tmp_path / "s3-requests.log")
    yield server
    server.stop()


@pytest.mark.integration
def test_an_s3_model_is_downloaded_once_for_the_whole_pipeline(s3, tmp_path):
    """run --local with an s3:// model: fetch, prepare, a two-process train, merge, evaluate
    and push read one copy in WORKSPACE/models; each file is downloaded exactly once, the
    pickle file never, and the manifest records the revision's digest."""
    sizes = upload_model(s3, "tiny-falcon", {"pytorch_model.bin": b"not for us"})
    env = s3_env_for(s3)
    work, output = tmp_path / "work", tmp_path / "model"
    result = run_cli(
        "run",
        TINY_DEMO,
        "--local",
        "--set",
        "model.name_or_path=s3://models/tiny-falcon",
        "--set",
        "train.max_steps=2",
        "--set",
        "eval.min_rouge_l=0",
        "--set",
        f"output.uri={output}",
        "--workspace",
        work,
        env=env,
        cwd=tmp_path,
    )
    assert result.code == 0, result
    downloads = s3.requests("GET", PREFIX)
    assert sorted(line.split(PREFIX)[1].split()[0] for line in downloads) == sorted(sizes)
    (folder,) = (work / "models").iterdir()  # no staging folder left beside it
    record = json.loads((folder / RECORD).read_text())
    assert folder.name == f"s3--models--tiny-falcon@{record['commit']}"
    # every file as S3 holds it (boto3 reads the sizes back), and nothing else
    listed = s3.client().list_objects_v2(Bucket="models", Prefix="tiny-falcon/")["Contents"]
    remote = {o["Key"].removeprefix("tiny-falcon/"): o["Size"] for o in listed}
    assert record["files"] == {k: v for k, v in remote.items() if k != "pytorch_model.bin"}
    assert sorted(p.name for p in folder.iterdir()) == sorted([*record["files"], RECORD])
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["base_model"] == {
        "name_or_path": "s3://models/tiny-falcon",
        "revision": None,
        "commit": record["commit"],
    }

    def fetch_again():
        model = "model.name_or_path=s3://models/tiny-falcon"
        return run_cli("fetch-model", TINY_DEMO, "--set", model, "--workspace", work, env=env)

    # a later fetch reuses the copy after checking sizes; a damaged copy is fetched again
    again = fetch_again()
    assert again.code == 0 and "already fetched" in again.out, again
    assert len(s3.requests("GET", PREFIX)) == len(sizes)
    with open(folder / "model.safetensors", "r+b") as f:
        f.truncate(100)
    repaired = fetch_again()
    assert repaired.code == 0 and "downloaded" in repaired.out, repaired
    assert len(s3.requests("GET", PREFIX)) == 2 * len(sizes)
    assert (folder / "model.safetensors").stat().st_size == sizes["model.safetensors"]
    assert [p.name for p in (work / "models").iterdir()] == [folder.name]

    # a changed object is a new revision: a new folder, the old one kept
    s3.client().put_object(Bucket="models", Key="tiny-falcon/generation_config.json", Body=b"{}")
    changed = fetch_again()
    assert changed.code == 0, changed
    assert len(list((work / "models").iterdir())) == 2


@pytest.mark.integration
def test_a_model_with_only_pickle_weights_is_refused(s3, tmp_path):
    upload_model(s3, "pickled", {})
    s3.client().delete_object(Bucket="models", Key="pickled/model.safetensors")
    s3.client().put_object(Bucket="models", Key="pickled/pytorch_model.bin", Body=b"x")
    result = run_cli(
        "fetch-model",
        TINY_DEMO,
        "--set",
        "model.name_or_path=s3://models/pickled",
        "--workspace",
        tmp_path / "work",
        env=s3_env_for(s3),
    )
    assert_user_error(
        result, "s3://models/pickled has no .safetensors weights", "pytorch_model.bin"
    )
    assert not (tmp_path / "work" / "models").exists() or not any(
        (tmp_path / "work" / "models").iterdir()
    )
    missing = run_cli(
        "fetch-model",
        TINY_DEMO,
        "--set",
        "model.name_or_path=s3://models/nothing-here",
        "--workspace",
        tmp_path / "work",
        env=s3_env_for(s3),
    )
    assert_user_error(missing, "s3://models/nothing-here holds no objects")


def test_which_files_are_fetched():
    files = {
        "config.json": 1,
        "model-00001-of-00002.safetensors": 2,
        "model.safetensors.index.json": 3,
        "tokenizer.json": 4,
        "tokenizer.model": 5,
        "pytorch_model.bin": 6,
        "optimizer.pt": 7,
        "modeling_custom.py": 8,
        "README.md": 9,
        ".gitattributes": 10,
        "original/consolidated.00.pth": 11,
    }
    assert sorted(wanted_files(files, "m", remote_code=False)) == [
        "config.json",
        "model-00001-of-00002.safetensors",
        "model.safetensors.index.json",
        "tokenizer.json",
        "tokenizer.model",
    ]
    assert "modeling_custom.py" in wanted_files(files, "m", remote_code=True)
    with pytest.raises(UserError, match="no config.json"):
        wanted_files({"model.safetensors": 1}, "m", False)
    assert slug("tiiuae/falcon-7b") == "tiiuae--falcon-7b"
    assert slug("s3://bucket/a/b/") == "s3--bucket--a--b"


def test_merge_refuses_an_adapter_trained_on_another_commit(tmp_path):
    from kubetune.components.config import load_recipe
    from kubetune.components.merge_adapter.step import check_base

    (tmp_path / "base_model.json").write_text(
        json.dumps({"name_or_path": "org/model", "revision": None, "commit": "aaa111"})
    )
    same = load_recipe(TINY_DEMO, ["model.name_or_path=org/model", "model.commit=aaa111"])
    check_base(same, tmp_path, {}, "unused")
    other = load_recipe(TINY_DEMO, ["model.name_or_path=org/model", "model.commit=bbb222"])
    with pytest.raises(UserError, match="at commit aaa111, but the fetched model .* bbb222"):
        check_base(other, tmp_path, {}, "unused")


@pytest.fixture
def hub():
    server = FakeHub()
    yield server
    server.close()


def test_a_hub_model_is_fetched_at_its_resolved_commit(hub, tmp_path):
    """A hub revision (here the branch main) is resolved to its commit before download; the
    folder is named after the commit, each file is downloaded once, pickle never; a new
    commit on main is a new folder, and a revision the hub lacks is a clear error."""
    source = Path(resolve_model("tiny://llama"))
    first = hub.push("org/tiny", source, {"pytorch_model.bin": b"pickle", "README.md": b"hi"})
    env = {"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf")}
    work = tmp_path / "work"

    def fetch(*sets):
        args = [a for s in ("model.name_or_path=org/tiny", *sets) for a in ("--set", s)]
        return run_cli("fetch-model", TINY_DEMO, *args, "--workspace", work, env=env)

    result = fetch()
    assert result.code == 0, result
    folder = work / "models" / f"org--tiny@{first}"
    assert f"folder: {folder}" in result.out
    wanted = sorted(p.name for p in source.iterdir() if p.is_file())
    assert sorted(p.name for p in folder.iterdir() if p.name != RECORD) == wanted
    for name in wanted:
        assert (folder / name).read_bytes() == (source / name).read_bytes()
    assert sorted(hub.downloads()) == sorted(f"/org/tiny/resolve/{first}/{n}" for n in wanted)
    assert json.loads((folder / RECORD).read_text())["commit"] == first

    assert fetch().code == 0 and len(hub.downloads()) == len(wanted)  # reused
    pinned = fetch(f"model.revision={first}")
    assert pinned.code == 0 and "already fetched" in pinned.out, pinned

    second = hub.push("org/tiny", source, {"notes.txt": b"v2"})
    assert fetch().code == 0
    assert sorted(p.name for p in (work / "models").iterdir()) == sorted(
        [f"org--tiny@{first}", f"org--tiny@{second}"]
    )
    assert_user_error(
        fetch("model.revision=v9"), "model.revision: 'v9' is not a revision of org/tiny"
    )
