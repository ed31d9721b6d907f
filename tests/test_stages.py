"""A recipe with `stages:` (components/stages.py): SFT then DPO in one pipeline, the DPO stage
starting from the SFT stage's merged model, each stage's outputs kept, the last evaluation
tabling the SFT model against SFT+DPO, only the last stage pushed."""

from __future__ import annotations

import json

import pytest
import yaml

from kubetune.components.config import load_recipe
from kubetune.components.errors import UserError
from kubetune.components.stages import stage_configs

from .conftest import REPO, run_cli

RECIPE = REPO / "pipelines" / "recipes" / "tiny-sft-dpo.yaml"


def test_each_stage_is_the_recipe_with_its_settings(tmp_path):
    cfg = load_recipe(RECIPE)
    sft, dpo = stage_configs(cfg)
    assert (sft.stage, dpo.stage) == ("sft", "dpo")
    assert sft.train.objective == "sft" and sft.data.format == "samsum"
    assert dpo.train.objective == "dpo" and dpo.data.path == "sample://preference"
    assert dpo.preference.beta == 0.1 and dpo.lora.r == sft.lora.r == 16
    assert not sft.stages and not dpo.stages
    bad = yaml.safe_load(RECIPE.read_text())
    bad["stages"][1]["set"].pop("data.format")
    bad["stages"][1]["set"].pop("data.max_prompt_len")
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(UserError, match=r"stages\[1\] \(dpo\): train.objective=dpo trains on"):
        load_recipe(path)
    bad["stages"][1]["set"]["model.name_or_path"] = "tiny://llama"
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(UserError, match="starts from the model the stage before it trained"):
        load_recipe(path)
    bad = yaml.safe_load(RECIPE.read_text())
    bad["stages"][1]["name"] = "sft"
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(UserError, match="every stage needs a name of its own"):
        load_recipe(path)


@pytest.mark.integration  # the compile command end to end
def test_the_compiled_pipeline_chains_the_stages(tmp_path):
    """Two of every step; the DPO stage's resolve takes its model from the SFT stage's merge."""
    out = tmp_path / "staged.yaml"
    result = run_cli("compile", RECIPE, "--output", out)
    assert result.code == 0, result
    ir = next(yaml.safe_load_all(out.read_text()))  # the pipeline spec, then the platform's
    tasks = ir["root"]["dag"]["tasks"]
    for step in ("resolve-recipe", "prepare-dataset", "train-model", "merge-model"):
        assert {step, f"{step}-2"} <= set(tasks), step
    model = tasks["resolve-recipe-2"]["inputs"]["parameters"]["model_name_or_path"]
    assert model["taskOutputParameter"]["producerTask"] == "merge-model"
    first = tasks["resolve-recipe"]["inputs"]["parameters"]
    assert first["model_name_or_path"]["runtimeValue"]["constant"] == "tiny://falcon"
    stage_recipe = yaml.safe_load(
        tasks["resolve-recipe-2"]["inputs"]["parameters"]["recipe_yaml"]["runtimeValue"]["constant"]
    )
    assert stage_recipe["stage"] == "dpo" and stage_recipe["train"]["objective"] == "dpo"
    assert set(ir["root"]["inputDefinitions"]["parameters"]) == {"overrides", "workspace"}


@pytest.mark.integration
def test_run_local_trains_sft_then_dpo_on_the_sft_model(tmp_path):
    result = run_cli(
        "run", RECIPE, "--local", "--set", "train.max_steps=4", "--set",
        f"output.uri={tmp_path / 'model'}", "--workspace", tmp_path / "work", cwd=tmp_path,
    )  # fmt: skip
    assert result.code == 0, result
    runs = sorted((tmp_path / "work" / "runs").iterdir())
    assert [r.name.rsplit("-", 1)[1] for r in runs] == ["dpo", "sft"]
    dpo, sft = runs
    for stage in (sft, dpo):  # every stage's outputs kept
        for part in ("dataset/stats.json", "train/metrics.json", "model/config.json",
                     "eval/metrics.json"):  # fmt: skip
            assert (stage / part).is_file(), (stage, part)
    trained = json.loads((dpo / "train" / "metrics.json").read_text())
    assert trained["objective"] == "dpo" and trained["steps"] == 4  # --set reached every stage
    assert json.loads((sft / "train" / "metrics.json").read_text())["objective"] == "sft"
    recipe = yaml.safe_load((dpo / "train" / "recipe.yaml").read_text())
    assert recipe["model"]["name_or_path"] == str(sft / "model")
    evaluation = json.loads((dpo / "eval" / "metrics.json").read_text())
    assert evaluation["baseline"]["model"] == str(sft / "model")  # SFT against SFT+DPO
    assert evaluation["tuned"]["preference_accuracy"] is not None
    assert evaluation["baseline"]["preference_accuracy"] is not None
    assert "reward_accuracy" in evaluation["tuned"]
    assert (tmp_path / "model" / "manifest.json").is_file()  # the last stage, pushed
    assert "pref acc" in result.out


def test_compare_refuses_a_staged_recipe_and_says_what_tables_the_stages():
    from .conftest import run_cli_here

    for where in (["--local"], ["--output", "unused.yaml"]):
        result = run_cli_here("compare", RECIPE, "--methods", "lora,full", *where)
        assert result.code == 2 and "this one has stages (sft, dpo)" in result.err, result
        assert "SFT against SFT+DPO" in result.err and "Traceback" not in result.err
