"""tiny://ARCH: real architectures, loaded through from_pretrained, byte-for-byte deterministic."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from kubetune.components.models import resolve_model
from kubetune.components.tiny_models import ARCHITECTURES

# Digests of the tensors (name + float32 bytes) and of the trained vocab/merges. They pin the
# contract "same weights and tokenizer on every machine": a change here means runs trained on
# an older tiny:// base can no longer be rebuilt, so bump TINY_SPEC_VERSION with it.
GOLDEN_TENSORS = {
    "falcon": "ce20b00e358138eb39d3c46face608e91430b20e5e9ae72b460dbbe8310ac064",
    "falcon-40b": "1606b332e6a0e138f143092bee3f2ce038d133c1e983bc25cd5a583230d638fb",
    "llama": "884506c4d23a5abd5de6d43adbe40f05dee7fa0380b29b349c5c4165f3d1ccd7",
    "mistral": "52ea8c21965616ee9be3be17d536a6ca359c715faa7986d4d275e19938bcf4e4",
    "qwen2": "bb1b1193b5a384e55ec9d47df98b0634a7eee19f69253d1c7f2ac3cb352c7f1f",
    "qwen3": "f11be1437dee74fae902fdad6918f5a8c200797c5d8ecf9c63e92f3426371cc0",
    "qwen3-moe": "2bffc5223f147e322841f2e954e2b3fff842821c91ebbe7fb7f617f9179620c1",
    "mixtral": "36e485eae23e2bf8feb68812b59ed7a2cf229334401c5741beef1d09d286089f",
    "gemma3": "6df753e4c7ac8f62b51865a847d8731415d9641bc81a8e85b67b5852dcb445cd",
    "gpt-oss": "b983acd95710aeeae0d72120c38f4d3ba18acc33bdb22083b57a903b4c5c40a1",
    "qwen3.5-moe": "f046aff58da8ea9dec8542f75413b856a4569eeebdbded00f377a7b2b5287bb3",
    "llama3.1": "c2da699751bb105d23e8a72ba8a8481e1c0ace7a273da56994801d854f084602",
}
GOLDEN_VOCAB = "ead00ce75f05807c1ac7d9495a385c2fb1220b881936a5fde3c8aef550e5af5f"
EXPECTED_MODEL_TYPE = {
    "falcon": "falcon",
    "falcon-40b": "falcon",
    "llama": "llama",
    "mistral": "mistral",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "qwen3-moe": "qwen3_moe",
    "mixtral": "mixtral",
    "gemma3": "gemma3_text",
    "gpt-oss": "gpt_oss",
    "qwen3.5-moe": "qwen3_5_moe_text",
    "llama3.1": "llama",
}
# transformers v5 holds a MoE layer's experts fused (experts.gate_up_proj, experts.down_proj:
# one 3-D tensor each) and saves them one expert at a time, as the hub's checkpoints are:
# (prefix on disk, gate, up, down) per model type
PER_EXPERT = {
    "qwen3_moe": ("mlp", "gate_proj", "up_proj", "down_proj"),
    "qwen3_5_moe_text": ("mlp", "gate_proj", "up_proj", "down_proj"),
    "mixtral": ("block_sparse_moe", "w1", "w3", "w2"),
}


def fused_from_disk(name: str, on_disk: dict, model_type: str) -> torch.Tensor:
    """A fused expert tensor of the loaded model, rebuilt from the per-expert tensors on disk."""
    prefix, gate, up, down = PER_EXPERT[model_type]
    layer, _, fused = name.rpartition(".experts.")
    layer = layer.rsplit(".mlp", 1)[0] + f".{prefix}"
    count = sum(
        1 for k in on_disk if k.startswith(f"{layer}.experts.") and k.endswith(f".{down}.weight")
    )
    experts = [f"{layer}.experts.{e}" for e in range(count)]
    if fused == "down_proj":
        return torch.stack([on_disk[f"{e}.{down}.weight"] for e in experts])
    assert fused == "gate_up_proj", name
    return torch.stack(
        [torch.cat([on_disk[f"{e}.{gate}.weight"], on_disk[f"{e}.{up}.weight"]]) for e in experts]
    )


def tensor_digest(folder) -> str:
    tensors = load_file(os.path.join(folder, "model.safetensors"))
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].to(torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def vocab_digest(folder) -> str:
    with open(os.path.join(folder, "tokenizer.json"), encoding="utf-8") as f:
        model = json.load(f)["model"]
    return hashlib.sha256(
        json.dumps([sorted(model["vocab"].items()), model["merges"]]).encode()
    ).hexdigest()


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_tiny_model_loads_through_from_pretrained(arch):
    folder = resolve_model(f"tiny://{arch}")
    config = AutoConfig.from_pretrained(folder)
    assert config.model_type == EXPECTED_MODEL_TYPE[arch]
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    size = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))
    assert size < 5_000_000, "a tiny model is a few MB at most"
    # Real architecture class, and it runs: loss of a forward pass over real text is finite.
    family_name = config.model_type.removesuffix("_text").replace("_", "")  # gemma3_text
    assert type(model).__name__.lower().replace("_", "").startswith(family_name)
    batch = tokenizer(["Anna: Lunch at 1 pm?\nTom: Yes."], return_tensors="pt")
    out = model(**batch, labels=batch["input_ids"])
    assert torch.isfinite(out.loss)
    # Weights on disk are exactly what from_pretrained loaded (nothing re-initialised).
    on_disk = load_file(os.path.join(folder, "model.safetensors"))
    state = model.state_dict()
    for name, tensor in state.items():
        if name in on_disk:
            assert torch.equal(on_disk[name], tensor), name
        elif ".experts." in name:
            assert torch.equal(fused_from_disk(name, on_disk, config.model_type), tensor), name
        elif name != "lm_head.weight" or not config.tie_word_embeddings:  # a renamed router
            prefix = PER_EXPERT[config.model_type][0]
            assert torch.equal(on_disk[name.replace(".mlp.", f".{prefix}.")], tensor), name
    assert tokenizer.eos_token_id == config.eos_token_id
    assert tokenizer.chat_template


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_tiny_model_matches_the_golden_digests(arch):
    folder = resolve_model(f"tiny://{arch}")
    assert tensor_digest(folder) == GOLDEN_TENSORS[arch]
    assert vocab_digest(folder) == GOLDEN_VOCAB


def test_same_bytes_in_fresh_processes_and_caches(tmp_path):
    """Two builds in separate processes with separate caches give identical files."""
    script = (
        "from kubetune.components.models import resolve_model;print(resolve_model('tiny://llama'))"
    )
    folders = []
    for name in ("a", "b"):
        env = {**os.environ, "KUBETUNE_CACHE": str(tmp_path / name)}
        out = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
        )
        folders.append(out.stdout.strip().splitlines()[-1])
    for filename in ("model.safetensors", "tokenizer.json"):
        a, b = (Path(f, filename).read_bytes() for f in folders)
        assert a == b, filename
    assert tensor_digest(folders[0]) == tensor_digest(resolve_model("tiny://llama"))


def test_unknown_tiny_architecture_is_a_user_error(cli, tmp_path):
    result = cli(
        "prepare",
        "tiny-demo",
        "--output",
        tmp_path / "o",
        "--set",
        "model.name_or_path=tiny://gpt9",
    )
    assert result.code == 2 and "unknown tiny architecture 'gpt9'" in result.err
