"""GPU paths (run with `python -m pytest -m gpu` on a CUDA machine; skipped elsewhere): the
chunked and Liger losses in bf16, packed rows through flex_attention / flash-attention 2
against each example alone, and the worker end to end with kernels, compile and QLoRA + FSDP."""

from __future__ import annotations

import copy
import importlib.util
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from kubetune.components.config import load_recipe
from kubetune.components.models import resolve_model
from kubetune.components.train.attention import transformers_attention, use_flex_attention
from kubetune.components.train.data import collate, document_block_mask
from kubetune.components.train.kernels import apply_kernels, select_kernels, use_chunked_loss

from .conftest import TINY_DEMO, run_prepare

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]
CUDA = torch.device("cuda", 0)


def tiny(arch: str, attn: str = "sdpa"):
    model = AutoModelForCausalLM.from_pretrained(
        resolve_model(f"tiny://{arch}"),
        dtype=torch.bfloat16,
        attn_implementation=transformers_attention(attn, arch.split("-")[0]),
    ).to(CUDA)
    if attn == "flex_attention":
        use_flex_attention(model)
    return model


def batch_on_gpu():
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 1000, (2, 512), generator=generator)
    labels = ids.clone()
    labels[:, :50] = -100
    return ids.to(CUDA), labels.to(CUDA)


@pytest.mark.parametrize("arch", ["falcon", "llama", "qwen2"])
def test_chunked_loss_on_gpu_equals_transformers(arch):
    reference = tiny(arch)
    chunked = copy.deepcopy(reference)
    use_chunked_loss(chunked)
    ids, labels = batch_on_gpu()
    want = reference(input_ids=ids, labels=labels).loss
    got = chunked(input_ids=ids, labels=labels).loss
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-3)
    want.backward()
    got.backward()
    a = reference.get_input_embeddings().weight.grad.float()
    b = chunked.get_input_embeddings().weight.grad.float()
    assert (a - b).norm() / a.norm() < 2e-2


@pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is None, reason="needs liger-kernel")
def test_liger_kernels_give_transformers_loss():
    cfg = load_recipe(TINY_DEMO, ["model.name_or_path=tiny://llama"])
    kernels = select_kernels(cfg, CUDA, "llama")
    assert kernels.loss == "liger_fused_linear_ce" and kernels.rms_norm == "liger"
    reference = tiny("llama")
    patched = copy.deepcopy(reference)
    apply_kernels(patched, kernels)
    patched.train()
    reference.train()
    ids, labels = batch_on_gpu()
    want = reference(input_ids=ids, labels=labels).loss
    got = patched(input_ids=ids, labels=labels).loss
    torch.testing.assert_close(got.float(), want.float(), atol=3e-2, rtol=5e-3)


def packed_attentions() -> list[str]:
    found = ["flex_attention"]
    if importlib.util.find_spec("flash_attn") is not None:
        found.append("flash_attention_2")
    return found


@pytest.mark.parametrize("arch", ["llama", "falcon", "falcon-40b"])
@pytest.mark.parametrize("attn", packed_attentions())
def test_packed_loss_equals_each_example_alone_on_gpu(attn, arch):
    """The loss of a packed row (no dense mask) is the token-weighted loss of its examples,
    each run alone through SDPA (the same weights)."""
    model, alone = tiny(arch, attn).eval(), tiny(arch, "sdpa").eval()
    use_chunked_loss(model)
    use_chunked_loss(alone)
    examples = [list(range(3 + i, 3 + i + n)) for i, n in enumerate((70, 130, 41))]
    packed = {
        "input_ids": sum(examples, []),
        "labels": sum(([-100] + e[1:] for e in examples), []),
        "position_ids": sum((list(range(len(e))) for e in examples), []),
    }
    batch = collate([packed], pad_id=1, attn=attn, dtype=torch.bfloat16)
    assert "attention_mask" not in batch
    inputs = {k: v.to(CUDA) for k, v in batch.items() if k != "tokens"}
    if attn == "flex_attention":
        inputs["attention_mask"] = document_block_mask(inputs["position_ids"])
    with torch.no_grad():
        got = model(**inputs).loss.float()
        total = tokens = 0.0
        for e in examples:
            ids = torch.tensor([e], device=CUDA)
            n = len(e) - 1
            total += float(alone(input_ids=ids, labels=ids).loss) * n
            tokens += n
    assert float(got) == pytest.approx(total / tokens, rel=1e-2)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-data") / "dataset"
    assert run_prepare(out, "model.name_or_path=tiny://llama").code == 0
    return out


@pytest.mark.parametrize(
    "sets",
    [
        ("method=lora",),
        ("method=lora", "train.compile=true"),
        ("method=qlora", "distributed.strategy=fsdp"),
        ("method=full", "distributed.strategy=fsdp"),
    ],
    ids=["lora", "lora-compiled", "qlora-fsdp", "full-fsdp-low-memory"],
)
def test_worker_on_gpu_trains_with_the_fast_paths(cli, dataset, tmp_path, sets):
    out = tmp_path / "run"
    args = [
        "--set",
        "model.name_or_path=tiny://llama",
        "--set",
        "distributed.procs_per_node=1",
        "--set",
        "train.max_steps=30",
    ]
    for item in sets:
        args += ["--set", item]
    result = cli("train", TINY_DEMO, "--dataset", dataset, "--output", out, *args)
    assert result.code == 0, result
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["device"] == "cuda"
    assert metrics["attn_implementation"] in ("flash_attention_2", "flex_attention")
    assert metrics["kernels"]["loss"] in ("chunked_linear_ce", "liger_fused_linear_ce")
    assert metrics["kernels"]["compile"] == ("train.compile=true" in sets)
    losses = [loss for _, loss in metrics["loss"]]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.05
