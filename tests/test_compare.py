"""`kubetune compare`: one KFP pipeline, prepare once, a ParallelFor branch per method, and the
comparison table and report, checked against what each branch's own steps wrote."""

from __future__ import annotations

import json
from html import escape

import pytest
import yaml

from kubetune.components.compare_methods.settings import (
    METHOD_DEFAULTS,
    branch_overrides,
    format_methods,
    parse_methods,
)
from kubetune.components.compare_methods.step import compare
from kubetune.components.config import load_recipe
from kubetune.pipelines.compare import compile_compare

from .conftest import RECIPES, TINY_DEMO, assert_user_error, run_cli


def test_compiled_comparison_fans_out_one_branch_per_method(tmp_path):
    out = tmp_path / "compare.yaml"
    methods = "lora,adapter:train.lr=0.02,adapter.start_layer=0,full"
    result = run_cli("compare", TINY_DEMO, "--methods", methods, "--output", out)
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
    # the KFP UI's `methods` parameter holds the same text, settings included
    assert spec["root"]["inputDefinitions"]["parameters"]["methods"]["defaultValue"] == methods
    assert "compare-methods" in root and "push-model" not in root


def test_a_recipe_without_a_lora_section_compiles_to_a_comparison(tmp_path):
    """Each pipeline field gets a value of its declared type (KFP refuses an integer for a
    float: llama3-70b-full-fsdp has no lora section, and lora.alpha's default was the integer
    32). tests/test_wheel.py compiles the comparison of every shipped recipe."""
    out = tmp_path / "compare.yaml"
    compile_compare(load_recipe(RECIPES / "llama3-70b-full-fsdp.yaml"), "lora,full", str(out))
    spec = next(yaml.safe_load_all(out.read_text()))
    resolve = spec["root"]["dag"]["tasks"]["resolve-recipe"]["inputs"]["parameters"]
    assert isinstance(resolve["lora_alpha"]["runtimeValue"]["constant"], float)


@pytest.mark.parametrize(
    "methods, message",
    [
        ("lora,dora", "unknown method 'dora'"),
        ("lora,lora", "lora is listed twice"),
        ("lora", "at least two methods"),
        ("train.lr=1,lora,adapter", "name the method first"),
        ("lora,adapter:train.lr", "adapter:train.lr: expected KEY=VALUE"),
        ("lora,adapter:data.max_seq_len=64", "data.max_seq_len: a branch may only change"),
        ("lora,adapter:train.lr=fast", "train.lr"),
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
        "lora,adapter_v2:train.lr=0.05",
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
    # each branch trained with what its settings.json says, and the table says it
    assert lora["settings"] == {} and lora["lr"] == pytest.approx(0.01)  # the recipe's own
    assert v2["settings"] == {
        "train.lr": {"value": "0.05", "from": "command line"},
        "train.weight_decay": {"value": "0.02", "from": "published"},
    }
    resolved = yaml.safe_load(
        (run / "methods" / "adapter_v2" / "train" / "recipe.yaml").read_text()
    )
    assert resolved["train"]["lr"] == v2["lr"] == 0.05
    assert resolved["train"]["weight_decay"] == 0.02
    assert lora["trainable_params"] != v2["trainable_params"]
    assert comparison["base"]["eval_loss"] > min(lora["eval_loss"], v2["eval_loss"])
    assert comparison["published_trainable_params"] is None  # not Falcon-7B
    table = (run / "comparison" / "comparison.md").read_text()
    assert table in result.out
    assert f"| adapter_v2 | 0.05 | {v2['trainable_params']:,} |" in table
    assert "train.lr=0.05 (command line); train.weight_decay=0.02 (published) |" in table
    assert "| the recipe's own |" in table
    report = (run / "comparison" / "report.html").read_text()
    first = json.loads(
        (run / "methods" / "adapter_v2" / "eval" / "generations.jsonl").read_text().splitlines()[0]
    )
    assert escape(first["tuned"]) in report and escape(first["reference"]) in report

    # the same branches compared as Falcon-7B: lit-parrot's published counts beside kubetune's
    again = compare(
        "tiiuae/falcon-7b",
        [run / "methods" / m / "eval" for m in ("lora", "adapter_v2")],
        tmp_path / "as-falcon-7b",
    )
    assert again["published_trainable_params"]["adapter_v2"] == 3_839_186
    table = (tmp_path / "as-falcon-7b" / "comparison.md").read_text()
    assert "published params" in table and "| 3,839,186 |" in table


def test_branch_settings_apply_published_then_recipe_then_command_line(tmp_path):
    recipe = yaml.safe_load(TINY_DEMO.read_text())
    recipe["compare"] = {"adapter": {"train.lr": 0.05, "adapter.start_layer": 0}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    cfg = load_recipe(path)
    assert branch_overrides(cfg, "lora") == {}  # the recipe's own method keeps its settings
    assert branch_overrides(cfg, "full") == {
        "train.lr": (repr(METHOD_DEFAULTS["full"]["train.lr"]), "published"),
        "train.weight_decay": ("0.0", "published"),
    }
    assert branch_overrides(cfg, "adapter", {"adapter.start_layer": "1"}) == {
        "train.lr": ("0.05", "recipe"),
        "train.weight_decay": ("0.02", "published"),
        "adapter.start_layer": ("1", "command line"),
    }
    methods, extra = parse_methods("lora, adapter:train.lr=9e-3,adapter.prompt_length=4 ,full")
    assert methods == ["lora", "adapter", "full"]
    assert extra == {
        "lora": {},
        "adapter": {"train.lr": "9e-3", "adapter.prompt_length": "4"},
        "full": {},
    }
    assert (
        format_methods(methods, extra) == "lora,adapter:train.lr=9e-3,adapter.prompt_length=4,full"
    )


@pytest.mark.parametrize(
    "section, message",
    [
        ({"dora": {"train.lr": 1}}, "compare.dora: not a method"),
        ({"adapter": {"eval.num_prompts": 2}}, "compare.adapter: eval.num_prompts"),
    ],
)
def test_bad_compare_sections_are_named(tmp_path, section, message):
    recipe = yaml.safe_load(TINY_DEMO.read_text())
    recipe["compare"] = section
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert_user_error(run_cli("config", path), message)
