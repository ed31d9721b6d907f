"""method=adapter / adapter_v2 (LLaMA-Adapter and v2): the published Falcon-7B parameter counts
on a meta-device Falcon-7B, peft's AdaptionPrompt as the reference for the attention math, and
merge folding Adapter v2 exactly (the merged model plus what stays unmerged computes what the
adapter on its base computes). Training, resume and the served adapter: tests/test_train.py."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM

from kubetune.components.artifacts import ADAPTER_WEIGHTS_FILE
from kubetune.components.config import load_recipe
from kubetune.components.errors import UserError
from kubetune.components.methods.llama_adapter import (
    AdapterSpec,
    install,
    load_into,
    save,
    split_falcon_qkv,
    trainable_count,
)
from kubetune.components.models import resolve_model
from kubetune.components.planner.architecture import architecture

from .conftest import RECIPES, TINY_DEMO, assert_user_error

FALCON_7B = RECIPES / "falcon-7b-qlora.yaml"
# lit-parrot's comparison on Falcon-7B (prompt length 10, adapter start layer 2).
PUBLISHED = {
    "full": 7_217_189_760,  # the head counted apart from the tied input embeddings
    "adapter": 1_365_330,
    "adapter_v2": 3_839_186,
    "lora": 3_506_176,  # r=8 on the query and value parts of the fused query_key_value
}


def tiny(arch: str) -> nn.Module:
    return AutoModelForCausalLM.from_pretrained(
        resolve_model(f"tiny://{arch}"), dtype=torch.float32, attn_implementation="sdpa"
    ).eval()


def test_trainable_counts_match_the_published_falcon_7b_figures(cli):
    sets = ["adapter.prompt_length=10", "adapter.start_layer=2"]
    counts = {}
    for method in ("adapter", "adapter_v2"):
        arch = architecture(load_recipe(FALCON_7B, [*sets, f"method={method}"]))
        counts[method] = arch.adapter_params
    assert counts == {"adapter": PUBLISHED["adapter"], "adapter_v2": PUBLISHED["adapter_v2"]}
    # the same through `kubetune plan`
    result = cli("plan", FALCON_7B, "--json", "--set", "method=adapter_v2")
    assert json.loads(result.out)["trainable_params"] == PUBLISHED["adapter_v2"], result
    # full: every parameter, the 65024 x 4544 head counted apart from the embeddings it shares
    assert arch.total_params + 65024 * 4544 == PUBLISHED["full"]

    # LoRA r=8: peft on the meta model wraps the whole fused query_key_value (q, k and v)
    from accelerate import init_empty_weights
    from peft import LoraConfig, get_peft_model

    from kubetune.components.planner.architecture import model_config

    with init_empty_weights():
        meta = AutoModelForCausalLM.from_config(model_config("tiiuae/falcon-7b"))
    lora = get_peft_model(meta, LoraConfig(r=8, target_modules=["query_key_value"]))
    peft_count = trainable_count(lora)
    assert peft_count == 32 * 8 * (4544 + 4672) == 2_359_296
    lora_cfg = load_recipe(
        FALCON_7B, ["method=lora", "lora.r=8", "lora.target_modules=[query_key_value]"]
    )
    assert architecture(lora_cfg).adapter_params == peft_count
    # lit-parrot's count is r=8 on q (4544 outputs) and v (64: multi-query) only
    assert PUBLISHED["lora"] == 32 * 8 * (2 * 4544 + 4544 + 64)
    assert PUBLISHED["adapter"] < peft_count < PUBLISHED["adapter_v2"]


@pytest.mark.parametrize(
    "layout",
    [{"multi_query": True}, {"new_decoder_architecture": True, "num_kv_heads": 2}, {}],
    ids=["multi-query", "grouped", "interleaved"],
)
def test_falcon_qkv_split_is_what_falcon_attention_attends_with(layout):
    """split_falcon_qkv against transformers' own Falcon attention, in each fused layout: the
    queries, keys and values it splits, rotated and attended causally, give the attention's
    output (the input of its dense projection), whatever version of transformers runs."""
    from transformers import FalconConfig, FalconForCausalLM
    from transformers.models.falcon.modeling_falcon import apply_rotary_pos_emb

    torch.manual_seed(0)
    settings = {"multi_query": False, "new_decoder_architecture": False, **layout}
    config = FalconConfig(
        hidden_size=64, num_attention_heads=4, num_hidden_layers=1, vocab_size=100, bias=False,
        alibi=False, parallel_attn=True, attn_implementation="eager", **settings,
    )  # fmt: skip
    model = FalconForCausalLM(config).eval()
    attn = model.transformer.h[0].self_attention
    seen = {}
    attn.register_forward_pre_hook(
        lambda m, args, kwargs: seen.update(h=kwargs.get("hidden_states", args[0] if args else None),
                                            rope=kwargs["position_embeddings"]),
        with_kwargs=True,
    )  # fmt: skip
    attn.dense.register_forward_pre_hook(lambda m, args: seen.update(out=args[0]))
    with torch.no_grad():
        model(torch.randint(0, 100, (2, 7)))
        query, key, value = split_falcon_qkv(attn, attn.query_key_value(seen["h"]), 16)
        assert query.shape == (2, 7, 4, 16)
        assert key.shape == value.shape == (2, 7, attn.num_kv_heads, 16)
        query, key, value = (t.transpose(1, 2) for t in (query, key, value))
        query, key = apply_rotary_pos_emb(query, key, *seen["rope"])
        repeat = 4 // key.shape[1]
        key, value = key.repeat_interleave(repeat, 1), value.repeat_interleave(repeat, 1)
        out = torch.nn.functional.scaled_dot_product_attention(query, key, value, is_causal=True)
    torch.testing.assert_close(out.transpose(1, 2).reshape(2, 7, 64), seen["out"])


def test_adapter_on_llama_computes_what_peft_adaption_prompt_computes():
    """peft's AdaptionPrompt (one gate per layer) is the reference: with every head's gate
    equal to peft's one gate and the same prompts, the logits match."""
    from peft import AdaptionPromptConfig, get_peft_model

    torch.manual_seed(0)
    base = tiny("llama")
    layers, hidden = base.config.num_hidden_layers, base.config.hidden_size
    ours = copy.deepcopy(base)
    install(ours, AdapterSpec("adapter", 5, 1))
    reference = get_peft_model(
        copy.deepcopy(base),
        AdaptionPromptConfig(adapter_len=5, adapter_layers=layers - 1, task_type="CAUSAL_LM"),
    )
    with torch.no_grad():
        for i in range(1, layers):
            prompt, gate = torch.randn(5, hidden), 0.3 + 0.2 * i
            mine = ours.model.layers[i].self_attn.adapter
            mine.prefix.copy_(prompt)
            mine.gate.fill_(gate)
            theirs = reference.base_model.model.model.layers[i].self_attn
            theirs.adaption_prompt.copy_(prompt[None])
            theirs.adaption_gate.fill_(gate)
        ids = torch.randint(0, 200, (2, 12))
        logits, expected, plain = ours(ids).logits, reference(ids).logits, base(ids).logits
    assert (logits - plain).abs().max() > 1e-2  # the prompts do change the output
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    heads = base.config.num_attention_heads  # a gate per head here, one per layer in peft
    assert trainable_count(ours) == trainable_count(reference) + (layers - 1) * (heads - 1)


@pytest.mark.parametrize("arch", ["falcon", "falcon-40b", "llama", "qwen2"])
def test_adapter_v2_starts_as_the_base_model_and_trains_every_tensor(arch):
    base = tiny(arch)
    model = copy.deepcopy(base)
    names = install(model, AdapterSpec("adapter_v2", 4, 0))
    ids = torch.randint(0, 200, (2, 10))
    with torch.no_grad():  # zero gates, zero biases, unit scales: the base model exactly
        torch.testing.assert_close(model(ids).logits, base(ids).logits, atol=1e-6, rtol=0)
        for name, p in model.named_parameters():
            if name.endswith("adapter.gate"):
                p.fill_(0.5)
    model(input_ids=ids, labels=ids).loss.backward()
    trained = dict(model.named_parameters())
    assert all(trained[n].grad is not None and trained[n].grad.abs().sum() > 0 for n in names)
    config = base.config
    linears = [m for m in base.modules() if isinstance(m, nn.Linear)]
    norms = [m for m in base.modules() if "norm" in type(m).__name__.lower()]
    expected = (
        config.num_hidden_layers * (4 * config.hidden_size + config.num_attention_heads)
        + sum(2 * m.out_features for m in linears)
        + sum(p.numel() for m in norms for p in m.parameters())
    )
    assert trainable_count(model) == expected


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_merge_folds_adapter_v2_and_serves_the_rest_unmerged(cli, tmp_path, arch):
    """Qwen2: tied head (its bias and scale stay unmerged), q/k/v biases (folded); Llama: an
    untied head (its scale folds). The merged folder computes what the adapter on its base does."""
    torch.manual_seed(1)
    base = tiny(arch)
    model = copy.deepcopy(base)
    names = install(model, AdapterSpec("adapter_v2", 3, 1))
    with torch.no_grad():  # a trained adapter: every tensor away from its initial value
        for name, p in model.named_parameters():
            if name in names:
                p.add_(torch.randn_like(p) * 0.1)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    save(
        adapter,
        AdapterSpec("adapter_v2", 3, 1),
        {n: p for n, p in model.named_parameters() if n in names},
    )
    (adapter / "base_model.json").write_text(
        json.dumps({"name_or_path": f"tiny://{arch}", "revision": None, "method": "adapter_v2"})
    )
    merged = tmp_path / "merged"
    result = cli(
        "merge",
        TINY_DEMO,
        "--adapter",
        adapter,
        "--output",
        merged,
        "--set",
        f"model.name_or_path=tiny://{arch}",
    )
    assert result.code == 0, result
    assert "served unmerged" in result.out
    summary = json.loads((merged / "merge.json").read_text())

    weights = load_file(str(next(Path(resolve_model(f"tiny://{arch}")).glob("*.safetensors"))))
    out = load_file(str(merged / "model.safetensors"))
    trained = load_file(str(adapter / ADAPTER_WEIGHTS_FILE))
    scale = trained["model.layers.0.self_attn.q_proj.adapter_v2.scale"]
    torch.testing.assert_close(
        out["model.layers.0.self_attn.q_proj.weight"],
        weights["model.layers.0.self_attn.q_proj.weight"] * scale[:, None],
    )
    residual = load_file(str(merged / ADAPTER_WEIGHTS_FILE))
    if arch == "qwen2":  # q_proj has a bias: s * (b + c) replaces it
        bias = trained["model.layers.0.self_attn.q_proj.adapter_v2.bias"]
        torch.testing.assert_close(
            out["model.layers.0.self_attn.q_proj.bias"],
            scale * (weights["model.layers.0.self_attn.q_proj.bias"] + bias),
        )
        assert "lm_head.adapter_v2.scale" in residual  # tied: nothing to fold into
        assert summary["folded_biases"] == 3 * base.config.num_hidden_layers
    else:
        assert "lm_head.weight" in out and "lm_head.adapter_v2.scale" not in residual
        assert summary["folded_biases"] == 0
    assert "model.layers.0.self_attn.q_proj.adapter_v2.scale" not in residual
    assert set(k for k in trained if "norm" in k) <= set(out)

    ids = torch.randint(0, 200, (2, 12))
    reference = copy.deepcopy(base)
    load_into(reference, adapter)
    merged_model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    assert load_into(merged_model, merged).merged
    with torch.no_grad():
        expected = reference(ids).logits
        torch.testing.assert_close(merged_model(ids).logits, expected, atol=1e-4, rtol=1e-4)
        assert (expected - base(ids).logits).abs().max() > 1e-2


def test_bad_adapter_settings_are_refused(cli, tmp_path):
    from transformers import GPT2Config

    from kubetune.components.methods.llama_adapter import check_architecture

    result = cli("plan", TINY_DEMO, "--set", "method=adapter", "--set", "adapter.start_layer=2")
    assert_user_error(result, "adapter.start_layer=2: the model has 2 decoder layers")
    result = cli("plan", TINY_DEMO, "--set", "method=adapter", "--set", "adapter.prompt_length=0")
    assert_user_error(result, "adapter.prompt_length")

    with pytest.raises(UserError, match="start_layer=2: the model has 2 decoder layers"):
        install(tiny("falcon"), AdapterSpec("adapter", 4, 2))
    with pytest.raises(UserError, match="not model type 'gpt2'"):
        check_architecture("adapter_v2", GPT2Config(), 0)
    spec_dir = tmp_path / "bad"
    spec_dir.mkdir()
    (spec_dir / "kubetune_adapter.json").write_text('{"method": "adapter"}')
    with pytest.raises(UserError, match="not a kubetune adapter spec"):
        load_into(tiny("falcon"), spec_dir)
