"""`kubetune compare`: one KFP pipeline, prepare once, a ParallelFor branch per method, and the
comparison table and report, checked against what each branch's own steps wrote."""

from __future__ import annotations

import json
from html import escape

import pytest
import yaml

from kubetune.components.compare_methods import compare_methods

from .conftest import TINY_DEMO, assert_user_error, run_cli


def test_compiled_comparison_fans_out_one_branch_per_method(tmp_path):
    out = tmp_path / "compare.yaml"
    result = run_cli("compare", TINY_DEMO, "--methods", "lora,adapter,full", "--output", out)
    assert result.code == 0, result
    spec = next(yaml.safe_load_all(out.read_text()))
    root = spec["root"]["dag"]["tasks"]
    loop = next(t for t in root.values() if "parameterIterator" in t)
    # the loop iterates over the branches task's output and holds train, merge, evaluate
    items = loop["parameterIterator"]["items"]["inputParameter"]
    assert items == "pipelinechannel--method-branches-Output"
    body = spec["components"][loop["componentRef"]["name"]]["dag"]["tasks"]
    assert set(body) == {"train-model", "merge-model", "evaluate-model"}
    assert "prepare-dataset" in root["method-branches"]["dependentTasks"]
    assert spec["root"]["inputDefinitions"]["parameters"]["methods"]["defaultValue"] == [
        "lora",
        "adapter",
        "full",
    ]
    assert "compare-methods" in root and "push-model" not in root


@pytest.mark.parametrize(
    "methods, message",
    [
        ("lora,dora", "unknown method 'dora'"),
        ("lora,lora", "lora is listed twice"),
        ("lora", "at least two methods"),
    ],
)
def test_bad_method_lists_are_refused(methods, message):
    assert_user_error(run_cli("compare", TINY_DEMO, "--methods", methods, "--local"), message)


def test_a_method_the_recipe_cannot_run_is_refused_before_anything_runs(tmp_path):
    result = run_cli(
        "compare",
        TINY_DEMO,
        "--methods",
        "lora,qlora",
        "--output",
        tmp_path / "c.yaml",
        "--set",
        "distributed.strategy=deepspeed",
    )
    assert_user_error(result, "--methods qlora", "distributed.strategy=ddp")
    assert not (tmp_path / "c.yaml").exists()


@pytest.mark.integration
def test_compare_local_trains_every_method_and_tables_them(tmp_path):
    work = tmp_path / "work"
    result = run_cli(
        "compare",
        TINY_DEMO,
        "--methods",
        "lora,adapter_v2",
        "--local",
        "--workspace",
        work,
        "--set",
        "train.max_steps=8",
        "--set",
        "eval.num_prompts=2",
        cwd=tmp_path,
    )
    assert result.code == 0, result.err[-3000:]
    (run,) = (work / "runs").iterdir()
    comparison = json.loads((run / "comparison" / "comparison.json").read_text())
    assert [row["method"] for row in comparison["methods"]] == ["lora", "adapter_v2"]
    for row in comparison["methods"]:  # each row is what its branch's own steps wrote
        branch = run / "methods" / row["method"]
        trained = json.loads((branch / "train" / "metrics.json").read_text())
        evaluated = json.loads((branch / "eval" / "metrics.json").read_text())
        assert trained["method"] == row["method"] and trained["steps"] == 8
        assert row["trainable_params"] == trained["trainable_params"]
        assert row["peak_memory_gb"] == trained["peak_memory_bytes"] / 1e9
        assert row["eval_loss"] == evaluated["tuned"]["eval_loss"]
        assert row["rougeL"] == evaluated["tuned"]["rougeL"]
        assert row["train_seconds"] == trained["train_seconds"] > 0
    # one prepared dataset for both branches
    assert [p.name for p in run.iterdir() if p.name == "dataset"] == ["dataset"]
    assert not (run / "methods" / "lora" / "dataset").exists()
    lora, v2 = comparison["methods"]
    assert lora["trainable_params"] != v2["trainable_params"]
    assert comparison["base"]["eval_loss"] > min(lora["eval_loss"], v2["eval_loss"])
    assert comparison["published_trainable_params"] is None  # not Falcon-7B
    table = (run / "comparison" / "comparison.md").read_text()
    assert table in result.out
    assert f"| adapter_v2 | {v2['trainable_params']:,} |" in table
    report = (run / "comparison" / "report.html").read_text()
    first = json.loads(
        (run / "methods" / "adapter_v2" / "eval" / "generations.jsonl").read_text().splitlines()[0]
    )
    assert escape(first["tuned"]) in report and escape(first["reference"]) in report

    # the same branches compared as Falcon-7B: lit-parrot's published counts beside kubetune's
    again = compare_methods(
        "tiiuae/falcon-7b",
        [run / "methods" / m / "eval" for m in ("lora", "adapter_v2")],
        tmp_path / "as-falcon-7b",
    )
    assert again["published_trainable_params"]["adapter_v2"] == 3_839_186
    table = (tmp_path / "as-falcon-7b" / "comparison.md").read_text()
    assert "published params" in table and "| 3,839,186 |" in table
