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
from kubetune.components.planner.kernel_choice import select_kernels
from kubetune.components.train.attention import transformers_attention, use_flex_attention
from kubetune.components.train.data import COUNTS, collate, document_block_mask
from kubetune.components.train.kernels import apply_kernels, use_chunked_loss

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
    hopper = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9
    if hopper and importlib.util.find_spec("flash_attn_interface") is not None:
        found.append("flash_attention_3")
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
    inputs = {k: v.to(CUDA) for k, v in batch.items() if k not in COUNTS}
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
        ("method=lora", "train.compile=false"),
        ("method=qlora", "distributed.strategy=fsdp"),
        ("method=full", "distributed.strategy=fsdp"),
        ("method=qlora", "model.name_or_path=tiny://falcon", "train.micro_batch_size=auto"),
    ],
    ids=["lora", "lora-eager", "qlora-fsdp", "full-fsdp-low-memory", "falcon-qlora-auto"],
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
    assert metrics["attn_implementation"] in packed_attentions()
    assert metrics["kernels"]["loss"] in ("chunked_linear_ce", "liger_fused_linear_ce")
    # compile auto: on for packed rows under ddp/fsdp on CUDA
    assert metrics["kernels"]["compile"] == ("train.compile=false" not in sets)
    assert metrics["gradient_checkpointing"]["layers"] == 0  # a tiny model fits any GPU
    if "method=qlora" in sets:
        assert set(metrics["precision"]["frozen"]) <= {"bfloat16", "uint8"}
        assert set(metrics["precision"]["trainable"]) == {"float32"}
    losses = [loss for _, loss in metrics["loss"]]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.05


def test_fused_lora_on_a_4bit_base_matches_peft_on_gpu():
    """The fused forward in bf16 against peft's (fp32 LoRA math) on a CUDA 4-bit base."""
    from kubetune.components.methods.lora import add_lora
    from kubetune.components.train.fused_lora import fuse_lora
    from kubetune.components.train.modeling import load_base

    cfg = load_recipe(TINY_DEMO, ["method=qlora", "model.name_or_path=tiny://llama"])
    reference = add_lora(cfg, load_base(cfg, CUDA)[0])
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    fused = copy.deepcopy(reference)
    assert fuse_lora(fused) > 0
    ids, labels = batch_on_gpu()
    grads = []
    for model in (reference, fused):
        model.train()
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        grads.append({n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad})
    for name, want in grads[0].items():
        assert (grads[1][name] - want).norm() <= 3e-2 * want.norm() + 1e-6, name


def test_a_single_kv_head_spread_over_the_query_heads_gives_the_same_attention():
    """Falcon-7B's one KV head given to each query head (flex's fast backward) computes what
    flex's grouped-query path computes, gradients included."""
    from kubetune.components.architectures.falcon import spread_single_kv_head
    from kubetune.components.train.attention import compiled_flex_attention

    generator = torch.Generator(device=CUDA).manual_seed(0)
    q = torch.randn(2, 8, 256, 64, device=CUDA, dtype=torch.bfloat16, generator=generator)
    k = torch.randn(2, 1, 256, 64, device=CUDA, dtype=torch.bfloat16, generator=generator)
    v = torch.randn(2, 1, 256, 64, device=CUDA, dtype=torch.bfloat16, generator=generator)
    positions = torch.arange(256, device=CUDA).remainder(100)[None].expand(2, -1)
    mask = document_block_mask(positions)
    results = []
    for spread in (False, True):
        qq, kk, vv = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
        keys, values = spread_single_kv_head(kk, vv, 8) if spread else (kk, vv)
        out = compiled_flex_attention()(
            qq, keys, values, block_mask=mask, enable_gqa=keys.shape[1] != 8
        )
        out.float().square().sum().backward()
        results.append((out.float(), qq.grad.float(), kk.grad.float(), vv.grad.float()))
    for a, b in zip(*results, strict=True):
        assert (a - b).norm() <= 2e-2 * a.norm()


def test_losses_land_without_a_host_sync_and_all_arrive_on_wait():
    """LossLog on CUDA: adding losses and a non-waiting flush never wait for the GPU (CUDA's
    sync debug mode raises on any synchronizing call); a non-waiting flush returns only what
    has landed, a waiting one the rest, in step order."""
    import os

    import torch.distributed as dist

    from kubetune.components.train.parallel import World
    from kubetune.components.train.progress import LossLog

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29533")
        dist.init_process_group("nccl", rank=0, world_size=1)
    log = LossLog(World(0, 0, 1, CUDA), [], None)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # a host sync from here raises
    try:
        for step in range(1, 6):
            log.add(step, torch.full((), float(step), device=CUDA), 1e-3, 10)
            landed = log.flush(wait=False)
            assert all(s <= step for s, _, _ in landed)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    log.flush()
    assert [s for s, _ in log.losses] == [1, 2, 3, 4, 5]
    assert [loss for _, loss in log.losses] == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert log.tokens == 50
