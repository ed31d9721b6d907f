"""The CLI basics and the run config: every recipe loads; bad keys and values name the key."""

from __future__ import annotations

import re

import pytest
import yaml

from kubetune.components.config import RunConfig, load_recipe
from kubetune.components.errors import UserError

from .conftest import RECIPES, TINY_DEMO, assert_user_error

RECIPE_FILES = sorted(RECIPES.glob("*.yaml"))


def test_help_and_version(cli):
    result = cli("--help")
    assert result.code == 0 and "prepare" in result.out
    result = cli("version")
    assert result.code == 0
    assert re.fullmatch(r"kubetune \d+\.\d+\.\d+\S*\n", result.out)


def test_the_recipes_the_issue_names_are_shipped():
    names = {p.stem for p in RECIPE_FILES}
    assert {
        "tiny-demo",
        "falcon-7b-qlora",
        "falcon-40b-qlora",
        "falcon-180b-lora-zero3",
        "llama3-8b-lora-fsdp",
    } <= names


@pytest.mark.parametrize("path", RECIPE_FILES, ids=lambda p: p.stem)
def test_every_recipe_loads_and_documents_its_command(path):
    cfg = load_recipe(path)
    assert isinstance(cfg, RunConfig)
    header = [line for line in path.read_text().splitlines() if line.startswith("#")]
    assert any(f"kubetune prepare pipelines/recipes/{path.name}" in line for line in header), (
        "the header comment must give the command that runs the recipe"
    )
    # Every key written in the recipe is a real field (nothing silently ignored).
    raw = yaml.safe_load(path.read_text())
    dumped = cfg.model_dump()
    for section, values in raw.items():
        if isinstance(values, dict):
            for key in values:
                assert key in dumped[section]


def test_config_command_applies_overrides(cli):
    result = cli(
        "config",
        TINY_DEMO,
        "--set",
        "data.max_seq_len=1024",
        "--set",
        "lora.target_modules=[q,v]",
        "--set",
        "data.packing=false",
    )
    assert result.code == 0, result
    cfg = yaml.safe_load(result.out)
    assert cfg["data"]["max_seq_len"] == 1024
    assert cfg["lora"]["target_modules"] == ["q", "v"]
    assert cfg["data"]["packing"] is False
    assert cfg["model"]["trust_remote_code"] is False
    assert cfg["kubernetes"]["namespace"]


def test_shipped_recipe_by_name(cli):
    result = cli("config", "tiny-demo")
    assert result.code == 0 and "tiny://falcon" in result.out


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.max_seq_len=-5", "--set data.max_seq_len=-5: data.max_seq_len must be > 0, got -5"),
        ("data.colour=red", "data.colour: unknown key"),
        (
            "method=sft",
            "method must be one of 'qlora', 'lora', 'full', 'adapter' or 'adapter_v2', got 'sft'",
        ),
        ("train.lr=fast", "train.lr: input should be a valid number"),
        ("data.eval_fraction=1.5", "data.eval_fraction must be < 1.0, got 1.5"),
        ("distributed.nodes=2", "distributed.nodes=2 needs distributed.backend=pytorchjob"),
        ("data.format=template", "data.template is required when data.format is template"),
        ("nonsense", "expected key=value"),
    ],
)
def test_bad_overrides_are_named(cli, tmp_path, override, message):
    result = cli("prepare", TINY_DEMO, "--output", tmp_path / "out", "--set", override)
    assert_user_error(result, message)
    assert not (tmp_path / "out").exists()


def test_recipe_errors_name_file_and_line(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(
        "model:\n  name_or_path: tiny://falcon\ndata:\n  path: x.jsonl\n"
        "  format: alpaca\n  max_seq_len: -5\n  colour: red\nquant:\n  bits: 3\n"
    )
    with pytest.raises(UserError) as err:
        load_recipe(recipe)
    text = str(err.value)
    assert f"{recipe}:6: data.max_seq_len must be > 0, got -5" in text
    assert f"{recipe}:7: data.colour: unknown key" in text
    assert f"{recipe}:9: quant.bits must be one of 4 or 8, got 3" in text


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "the recipe is empty"),
        ("- a\n- b\n", "a recipe is a YAML mapping"),
        ("model: [\n", "invalid YAML"),
        ("data:\n  path: x\n  format: alpaca\n", "model: required key is missing"),
    ],
)
def test_malformed_recipes(cli, tmp_path, content, message):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(content)
    assert_user_error(cli("config", recipe), message)


def test_missing_recipe(cli, tmp_path):
    assert_user_error(cli("config", tmp_path / "nope.yaml"), "no such recipe file")
