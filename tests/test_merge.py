"""`kubetune merge` against peft: logits of the merged model equal PeftModel's and peft's own
merge_and_unload (atol 1e-4, fp32), across architectures and LoRA variants."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from kubetune.components.models import resolve_model

from .conftest import TINY_DEMO, assert_user_error

TARGETS = {
    "falcon": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"],
}


def make_adapter(arch: str, folder, rslora=False, bias="none", seed=0):
    """A peft adapter with random (non-zero) LoRA B and biases, made by peft itself."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(
        resolve_model(f"tiny://{arch}"), dtype=torch.float32
    )
    model = get_peft_model(
        base,
        LoraConfig(r=4, lora_alpha=12, target_modules=TARGETS[arch], use_rslora=rslora, bias=bias),
    )
    with torch.no_grad():
        for _name, p in model.named_parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    model.save_pretrained(folder)
    return folder


def merge(cli, adapter, out, arch: str | None = None):
    """`kubetune merge tiny-demo.yaml --adapter ADAPTER --output OUT [--set model=tiny://ARCH]`."""
    model = ["--set", f"model.name_or_path=tiny://{arch}"] if arch else []
    return cli("merge", TINY_DEMO, "--adapter", adapter, "--output", out, *model)


def logits(model, ids=((5, 9, 300, 17, 2, 44, 1000, 7),)) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids)).logits


@pytest.mark.parametrize(
    "arch, rslora, bias",
    [
        ("falcon", False, "none"),  # fused query_key_value
        ("llama", True, "none"),  # rank-stabilised scaling
        ("qwen2", False, "lora_only"),  # q/k/v biases trained with the adapter
    ],
)
def test_merge_matches_peft(cli, tmp_path, arch, rslora, bias):
    from peft import PeftModel

    adapter = make_adapter(arch, tmp_path / "adapter", rslora=rslora, bias=bias)
    out = tmp_path / "merged"
    result = merge(cli, adapter, out, arch)
    assert result.code == 0, result
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)

    def base():
        return AutoModelForCausalLM.from_pretrained(
            resolve_model(f"tiny://{arch}"), dtype=torch.float32
        )  # noqa: E731

    with_adapter = PeftModel.from_pretrained(base(), adapter)
    peft_merged = PeftModel.from_pretrained(base(), adapter).merge_and_unload()
    torch.testing.assert_close(logits(merged), logits(with_adapter), atol=1e-4, rtol=0)
    torch.testing.assert_close(logits(merged), logits(peft_merged), atol=1e-4, rtol=0)
    assert (logits(merged) - logits(base())).abs().max() > 1e-2  # the adapter did something
    assert {p.name for p in out.iterdir()} >= {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "merge.json",
    }


def test_merge_refuses_an_adapter_of_another_base(cli, tmp_path):
    adapter = make_adapter("llama", tmp_path / "adapter")
    result = merge(cli, adapter, tmp_path / "m")
    assert_user_error(result, "adapter_config.json names base")
    assert not (tmp_path / "m").exists()


def test_merge_refuses_mismatched_shapes(cli, tmp_path):
    adapter = make_adapter("falcon", tmp_path / "adapter")
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "tiny://falcon-40b"  # claim another base, same names
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    result = merge(cli, adapter, tmp_path / "m", "falcon-40b")
    assert_user_error(result, "query_key_value.weight has shape")
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


def test_merge_refuses_a_folder_without_an_adapter(cli, tmp_path):
    assert_user_error(
        merge(cli, tmp_path, tmp_path / "m"),
        "not a LoRA adapter",
    )


def test_merge_refuses_an_adapter_targeting_missing_weights(cli, tmp_path):
    from safetensors.torch import load_file, save_file

    adapter = make_adapter("falcon", tmp_path / "adapter")
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    renamed = {k.replace("h.1.mlp.dense_4h_to_h", "h.1.mlp.ghost"): v for k, v in tensors.items()}
    save_file(renamed, str(adapter / "adapter_model.safetensors"))
    result = merge(cli, adapter, tmp_path / "m")
    assert_user_error(result, "targets transformer.h.1.mlp.ghost.weight, which the base model")
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def fused_copy(arch: str, folder):
    """tiny://ARCH with its experts saved fused (transformers v5's 3-D tensors, fp32), where
    the tiny model on disk, as the hub's checkpoints, has one tensor per expert."""
    import shutil

    from safetensors.torch import save_file

    source = resolve_model(f"tiny://{arch}")
    shutil.copytree(source, folder)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    assert any(k.endswith("experts.gate_up_proj") for k in state)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


@pytest.mark.integration  # a merge end to end per layout: ~9 s each on 2 cores
@pytest.mark.parametrize(
    "arch, layout",
    [
        ("qwen3-moe", "as-saved"),  # one tensor per expert, as the hub stores them
        ("qwen3-moe", "fused"),
        ("mixtral", "as-saved"),  # block_sparse_moe.experts.E.w1/w3/w2
        ("gpt-oss", "as-saved"),  # fused and transposed (experts x in x out), with biases
    ],
)
def test_merge_folds_lora_on_the_experts_exactly(cli, tmp_path, arch, layout):
    """An adapter made by peft itself on a MoE model (attention modules and the fused experts
    as parameters: target_parameters), merged by `kubetune merge` into a base stored one
    tensor per expert (the hub's layout; Mixtral's block_sparse_moe w1/w3/w2) or fused: the
    merged model, loaded by transformers, gives peft's logits with the adapter and after
    peft's own merge_and_unload."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from safetensors import safe_open

    source = resolve_model(f"tiny://{arch}")
    if layout == "fused":
        source = str(fused_copy(arch, tmp_path / "base"))

    def base():
        return AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)

    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=12, target_modules=["q_proj", "v_proj"],
                        target_parameters=EXPERTS)  # fmt: skip
    model = get_peft_model(base(), config)
    with torch.no_grad():
        for _name, p in model.named_parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    adapter = tmp_path / "adapter"
    model.save_pretrained(adapter)
    out = tmp_path / "merged"
    result = cli("merge", TINY_DEMO, "--adapter", adapter, "--output", out,
                 "--set", f"model.name_or_path={source}")  # fmt: skip
    assert result.code == 0, result
    summary = json.loads((out / "merge.json").read_text())
    assert summary["merged_expert_weights"] == 2 * 2 and summary["merged_weights"] == 2 * 2
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with_adapter = PeftModel.from_pretrained(base(), adapter)
    peft_merged = PeftModel.from_pretrained(base(), adapter).merge_and_unload()
    torch.testing.assert_close(logits(merged), logits(with_adapter), atol=1e-4, rtol=0)
    torch.testing.assert_close(logits(merged), logits(peft_merged), atol=1e-4, rtol=0)
    assert (logits(merged) - logits(base())).abs().max() > 1e-2
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())  # noqa: SIM118
    with safe_open(str(Path(source) / "model.safetensors"), "pt") as f:
        assert keys == set(f.keys())  # noqa: SIM118 (the base's names, in its layout)


def expert_adapter(arch: str, folder, base_name: str | None):
    """A peft adapter (zero-initialised B) on tiny://ARCH's q_proj and fused experts, its
    adapter_config.json naming `base_name` as its base."""
    from peft import LoraConfig, get_peft_model

    base = AutoModelForCausalLM.from_pretrained(resolve_model(f"tiny://{arch}"))
    config = LoraConfig(r=4, target_modules=["q_proj"], target_parameters=EXPERTS)
    get_peft_model(base, config).save_pretrained(folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = base_name
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def test_merge_refuses_expert_lora_a_base_lacks(cli, tmp_path):
    """An expert adapter of Qwen3-MoE merged into a dense base: refused, naming the tensor."""
    adapter = expert_adapter("qwen3-moe", tmp_path / "adapter", None)
    out = tmp_path / "merged"
    result = merge(cli, adapter, out, "qwen3")
    assert_user_error(result, "model.layers.0.mlp.experts.", "does not have")
    assert not out.exists()


@pytest.mark.integration
def test_merge_refuses_an_mxfp4_base_with_one_line(cli, tmp_path):
    """An adapter on gpt-oss's experts merged into the MXFP4 checkpoint (tests/mxfp4.py):
    refused, naming the packed tensor, nothing written."""
    from .mxfp4 import mxfp4_copy

    folder = mxfp4_copy(resolve_model("tiny://gpt-oss"), tmp_path / "base")
    adapter = expert_adapter("gpt-oss", tmp_path / "adapter", str(folder))
    out = tmp_path / "merged"
    result = cli("merge", TINY_DEMO, "--adapter", adapter, "--output", out,
                 "--set", f"model.name_or_path={folder}")  # fmt: skip
    assert_user_error(result, "stores its experts in MXFP4", "_proj_blocks")
    assert not out.exists()
