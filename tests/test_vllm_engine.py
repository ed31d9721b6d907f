"""eval.engine=vllm: refused with one line where it cannot run, compiled into the eval image on
GPU nodes, and (on a CUDA machine with vLLM) the same greedy answers as the hf engine."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
import yaml

from kubetune.components.config import load_recipe
from kubetune.components.errors import UserError
from kubetune.components.evaluate.step import ModelLocation, generate, locate
from kubetune.components.evaluate.vllm_engine import generate_vllm, tensor_parallel
from kubetune.components.models import load_tokenizer

from .conftest import RECIPES, TINY_DEMO, assert_user_error, run_cli

VLLM_HERE = importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()


@pytest.mark.skipif(VLLM_HERE, reason="vLLM runs here")
def test_vllm_is_refused_where_it_cannot_run(tiny_dataset, tmp_path):
    result = run_cli(
        "evaluate", TINY_DEMO, "--model", "tiny://falcon", "--dataset", tiny_dataset,
        "--output", tmp_path / "out", "--set", "eval.engine=vllm",
    )  # fmt: skip
    assert_user_error(result, "eval.engine=vllm needs vLLM and a CUDA GPU")
    assert not (tmp_path / "out").exists()


def test_tensor_parallel_divides_the_heads():
    assert tensor_parallel(8, 71) == 1  # Falcon-7B: one GPU
    assert tensor_parallel(8, 64) == 8
    assert tensor_parallel(6, 32) == 4
    assert tensor_parallel(0, 32) == 1


def test_a_llama_adapter_folder_is_refused_before_vllm_starts(tmp_path):
    cfg = load_recipe(TINY_DEMO)
    where = ModelLocation("base", None, tmp_path, "prompts")
    with pytest.raises(UserError, match="LLaMA-Adapter folder cannot be served by vLLM"):
        generate_vllm(where, cfg, [[1, 2]], load_tokenizer(cfg.model), torch.bfloat16)


def test_compile_runs_a_vllm_evaluate_in_the_eval_image(tmp_path):
    out = tmp_path / "p.yaml"
    result = run_cli(
        "compile", RECIPES / "falcon-7b-qlora.yaml", "--output", out,
        "--set", "eval.engine=vllm", "--set", "kubernetes.eval_image=registry.local/eval:1",
    )  # fmt: skip
    assert result.code == 0, result
    ir = next(yaml.safe_load_all(out.read_text()))
    executors = ir["deploymentSpec"]["executors"]
    assert executors["exec-evaluate-model"]["container"]["image"] == "registry.local/eval:1"
    resources = executors["exec-evaluate-model"]["container"]["resources"]
    assert resources["accelerator"]["resourceType"] == "nvidia.com/gpu"
    assert executors["exec-train-model"]["container"]["image"] != "registry.local/eval:1"
    # a recipe without GPU nodes cannot run vLLM on the cluster: refused at compile time
    cpu = run_cli(
        "compile", TINY_DEMO, "--output", tmp_path / "c.yaml", "--set", "eval.engine=vllm"
    )
    assert_user_error(cpu, "eval.engine=vllm generates on the GPU nodes")
    assert not (tmp_path / "c.yaml").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not VLLM_HERE, reason="needs vLLM and CUDA")
def test_vllm_and_hf_give_the_same_greedy_answers(tiny_dataset, monkeypatch):
    """float32 on both sides (vLLM's FlexAttention backend runs it), so a near-tie between
    two tokens of the random tiny model cannot flip one engine's greedy pick."""
    from datasets import load_from_disk

    from kubetune.components.evaluate.step import decode_answer, load_model, prompt_ids

    monkeypatch.setenv("VLLM_ATTENTION_BACKEND", "FLEX_ATTENTION")
    cfg = load_recipe(TINY_DEMO, ["model.name_or_path=tiny://llama", "eval.max_new_tokens=24"])
    tokenizer = load_tokenizer(cfg.model)
    rows = load_from_disk(str(tiny_dataset))["eval"].select(range(8))
    # the tiny demo's data is tokenized for tiny://falcon; both tiny models share the tokenizer
    prompts = [prompt_ids(row) for row in rows]
    where = locate("tiny://llama", cfg)
    from_vllm = [
        decode_answer(tokenizer, ids)
        for ids in generate_vllm(where, cfg, prompts, tokenizer, torch.float32)
    ]
    model = load_model("tiny://llama", cfg, torch.float32, torch.device("cuda"))
    from_hf = generate(model, tokenizer, prompts, cfg)
    assert from_vllm == from_hf
    assert any(from_hf)


def test_an_adapter_on_the_experts_is_refused_before_vllm_starts(tmp_path):
    """peft's parameter LoRA on a MoE model's fused experts: vLLM cannot load it, one line."""
    cfg = load_recipe(TINY_DEMO)
    config = {"r": 4, "target_parameters": ["mlp.experts.gate_up_proj"]}
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    where = ModelLocation("base", None, tmp_path, "lora")
    with pytest.raises(UserError, match="fused experts .*evaluate the merged model"):
        generate_vllm(where, cfg, [[1, 2]], load_tokenizer(cfg.model), torch.bfloat16)
