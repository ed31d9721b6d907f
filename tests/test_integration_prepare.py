"""prepare from an S3 object on a real loopback S3 server, and the KFP component under kfp.local."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from datasets import load_from_disk

from .conftest import (
    TINY_DEMO,
    assert_user_error,
    dolly_rows,
    run_prepare,
    samsum_rows,
    write_jsonl,
)

pytestmark = pytest.mark.integration


def test_prepare_reads_an_s3_object(cli, tmp_path, s3):
    client = s3.client()
    client.create_bucket(Bucket="data")
    body = write_jsonl(tmp_path / "s.jsonl", samsum_rows(30)).read_bytes()
    client.put_object(Bucket="data", Key="sets/samsum.jsonl", Body=body)
    out = tmp_path / "out"
    result = run_prepare(
        out,
        "data.path=s3://data/sets/samsum.jsonl",
        env={**s3.env(), "KUBETUNE_CACHE": str(tmp_path / "cache")},
    )
    assert result.code == 0, result
    stats = json.loads((out / "stats.json").read_text())
    assert stats["rows_read"] == 30 and stats["source"] == "s3://data/sets/samsum.jsonl"
    assert len(load_from_disk(str(out))["eval"]) == stats["splits"]["eval"]


def test_s3_errors_are_clear(cli, tmp_path, s3):
    env = {**s3.env(), "KUBETUNE_CACHE": str(tmp_path / "cache")}
    missing = cli(
        "prepare",
        TINY_DEMO,
        "--output",
        tmp_path / "o",
        "--set",
        "data.path=s3://nobucket/x.jsonl",
        env=env,
    )
    assert_user_error(missing, "s3://nobucket/x.jsonl: the bucket does not exist")
    unreachable = cli(
        "prepare",
        TINY_DEMO,
        "--output",
        tmp_path / "o",
        "--set",
        "data.path=s3://b/x.jsonl",
        env={**env, "AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9", "AWS_MAX_ATTEMPTS": "1"},
    )
    assert_user_error(unreachable, "s3://b/x.jsonl: cannot reach the S3 endpoint")
    assert not (tmp_path / "o").exists()


def test_kfp_component_runs_under_kfp_local(tmp_path, monkeypatch):
    from kfp import local

    from kubetune.components.config import dump_config, load_recipe
    from kubetune.components.prepare_dataset.component import prepare_dataset

    monkeypatch.chdir(tmp_path)
    data = write_jsonl(tmp_path / "d.jsonl", dolly_rows(40))
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "root"))
    cfg = load_recipe(str(TINY_DEMO), [f"data.path={data}", "data.format=dolly"])
    task = prepare_dataset(recipe_yaml=dump_config(cfg), run_dir=str(tmp_path / "run"))
    dataset_dir = Path(task.outputs["Output"])
    assert dataset_dir == tmp_path / "run" / "dataset"
    stats = json.loads((dataset_dir / "stats.json").read_text())
    assert stats["rows_read"] == 40
    metrics = task.outputs["metrics"].metadata
    assert metrics["rows_read"] == 40.0 and metrics["train_rows"] == stats["splits"]["train"]
    summary = Path(task.outputs["summary"].path).read_text()
    assert "| rows read | 40 |" in summary
    assert set(load_from_disk(str(dataset_dir))) == {"train", "eval"}
