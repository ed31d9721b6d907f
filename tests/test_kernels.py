"""Training speed paths checked on CPU against independent references: the chunked loss against
transformers' own loss and gradients, kernel selection, the prefetching loader against BatchPlan,
flex_attention's document mask against each example run alone."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from kubetune.components.config import load_recipe
from kubetune.components.errors import UserError
from kubetune.components.models import resolve_model
from kubetune.components.planner.kernel_choice import chunk_rows, select_kernels
from kubetune.components.tiny_models import ARCHITECTURES
from kubetune.components.train.data import COUNTS, BatchPlan, batch_loader, collate
from kubetune.components.train.kernels import linear_cross_entropy, use_chunked_loss

from .conftest import TINY_DEMO

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)


def cfg(*sets):
    return load_recipe(TINY_DEMO, list(sets))


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_chunked_loss_equals_transformers_loss_and_gradients(arch):
    """The model's loss and every parameter's gradient equal transformers' full-logits ones."""
    reference = AutoModelForCausalLM.from_pretrained(resolve_model(f"tiny://{arch}"))
    chunked = copy.deepcopy(reference)
    use_chunked_loss(chunked)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 1000, (2, 40), generator=generator)
    labels = ids.clone()
    labels[:, :5] = -100
    labels[1, 30:] = -100
    positions = torch.arange(40).repeat(2, 1)
    expected = reference(input_ids=ids, labels=labels, position_ids=positions).loss
    expected.backward()
    out = chunked(input_ids=ids, labels=labels, position_ids=positions)
    assert out.logits is None  # the full logits were never built
    out.loss.backward()
    torch.testing.assert_close(out.loss, expected, atol=1e-6, rtol=1e-6)
    pairs = zip(reference.named_parameters(), chunked.named_parameters(), strict=True)
    for (name, a), (_, b) in pairs:
        if a.grad is not None:
            torch.testing.assert_close(b.grad, a.grad, atol=1e-6, rtol=1e-4, msg=name)
    # without labels (generation) the model's own forward runs and returns logits
    with torch.no_grad():
        torch.testing.assert_close(chunked(input_ids=ids).logits, reference(input_ids=ids).logits)


def test_linear_cross_entropy_over_many_chunks_with_a_trained_head():
    """Small chunks, uneven tail, masked rows, a trained head, a scaled loss: all gradients equal
    plain cross_entropy's."""
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(3, 50, 16, generator=generator, requires_grad=True)
    weight = torch.randn(300, 16, generator=generator, requires_grad=True)
    labels = torch.randint(0, 300, (3, 50), generator=generator)
    labels[0, :10] = -100
    logits = hidden @ weight.t()
    plain = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, 300), labels[:, 1:].reshape(-1)
    )
    grads = torch.autograd.grad(plain * 3, (hidden, weight))
    ours = linear_cross_entropy(hidden, weight, labels, chunk=7)
    torch.testing.assert_close(ours, plain)
    for got, want in zip(torch.autograd.grad(ours * 3, (hidden, weight)), grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    with torch.no_grad():  # evaluation: the same loss, no gradient work
        torch.testing.assert_close(linear_cross_entropy(hidden, weight, labels), plain)


def test_chunk_rows_follows_the_vocab_to_hidden_ratio():
    assert chunk_rows(8192, 4096, 128256) == 256  # Llama-3: V/H rounds up to 32
    assert chunk_rows(32768, 4096, 128256) == 1024
    assert chunk_rows(100, 64, 1024) == 256  # never below 256
    assert chunk_rows(8192, 4544, 65024) & (chunk_rows(8192, 4544, 65024) - 1) == 0


def test_kernel_selection(monkeypatch):
    import kubetune.components.planner.kernel_choice as kernels

    auto = cfg()
    on_cpu = select_kernels(auto, CPU, "llama")
    assert (on_cpu.loss, on_cpu.rms_norm) == ("chunked_linear_ce", "transformers")
    assert select_kernels(cfg("train.kernels=none"), CPU, "llama").loss == "transformers"
    monkeypatch.setattr(kernels, "liger_installed", lambda: True)
    liger = select_kernels(auto, CUDA, "llama")
    assert liger.as_dict() == {
        "rms_norm": "liger",
        "rope": "liger",
        "swiglu": "liger",
        "loss": "liger_fused_linear_ce",
        "compile": False,  # auto: only for packed rows (static shapes)
        "lora": "fused",
    }
    assert select_kernels(auto, CUDA, "llama", packed=True).compile is True
    assert select_kernels(auto, CPU, "llama", packed=True).compile is False
    zero3 = cfg("distributed.strategy=deepspeed")
    assert select_kernels(zero3, CUDA, "llama", packed=True).compile is False
    assert select_kernels(zero3, CPU, "llama").lora == "peft"  # ZeRO-3 gathers per submodule
    assert select_kernels(cfg("train.compile=true"), CPU, "llama").compile is True
    assert select_kernels(cfg("method=full"), CPU, "llama").lora == "none"
    falcon = select_kernels(auto, CUDA, "falcon")  # no Liger for Falcon: the chunked loss
    assert (falcon.loss, falcon.swiglu) == ("chunked_linear_ce", "transformers")
    zero3_full = cfg("method=full", "distributed.strategy=deepspeed", "distributed.zero_stage=3")
    assert select_kernels(zero3_full, CUDA, "llama").loss == "transformers"
    with pytest.raises(UserError, match="train.kernels=liger: Liger has no kernels for model type"):
        select_kernels(cfg("train.kernels=liger"), CUDA, "falcon")
    with pytest.raises(UserError, match="need a CUDA device"):
        select_kernels(cfg("train.kernels=liger"), CPU, "llama")
    monkeypatch.setattr(kernels, "liger_installed", lambda: False)
    assert select_kernels(auto, CUDA, "qwen2").loss == "chunked_linear_ce"
    with pytest.raises(UserError, match="liger-kernel is not installed"):
        select_kernels(cfg("train.kernels=liger"), CUDA, "qwen2")


def rows(n: int) -> list[dict]:
    out = []
    for i in range(n):
        length = 3 + i % 5
        ids = list(range(10 + i, 10 + i + length))
        out.append({"input_ids": ids, "labels": ids, "position_ids": list(range(length))})
    return out


def test_loader_yields_batch_plan_order_from_any_step():
    """The prefetching loader (a worker process) yields exactly BatchPlan's micro batches,
    collated, from any starting point: a resumed run continues the order."""
    from datasets import Dataset

    data = rows(37)
    split = Dataset.from_list(data)
    plan = BatchPlan(len(split), 4, 1, 2, seed=5)
    for first in (0, 7):
        loader = batch_loader(split, plan, first, first + 12, 0, "sdpa", torch.float32, pin=False)
        got = list(loader)
        assert len(got) == 12
        for k, batch in zip(range(first, first + 12), got, strict=True):
            want = collate([data[int(i)] for i in plan.rows(k)], 0, "sdpa", torch.float32)
            assert batch.keys() == want.keys()
            for key in want:
                if key in COUNTS:  # host-side numbers: real/padded tokens, examples
                    assert batch[key] == want[key]
                else:
                    assert torch.equal(batch[key], want[key]), (k, key)


def test_flex_collate_builds_no_dense_mask():
    batch = collate(rows(3), 0, "flex_attention", torch.float32, pad_to=16)
    assert "attention_mask" not in batch
    # the counts the benchmark reports: real tokens, computed (padded) tokens, examples
    packed = {k: sum((r[k] for r in rows(3)), []) for k in ("input_ids", "labels", "position_ids")}
    batch = collate([packed, rows(4)[3]], 0, "flex_attention", torch.float32, pad_to=16)
    assert (batch["tokens"], batch["padded_tokens"], batch["examples"]) == (12 + 6, 32, 4)
    assert "attention_mask" in collate(rows(3), 0, "sdpa", torch.float32)


def test_flex_batches_have_one_shape():
    """flex_attention batches are padded to data.max_seq_len rounded up to whole 128-token
    blocks, whatever their rows' lengths: the compiled kernels see one shape. The pads are an
    example of their own that counts no tokens and carries no labels."""
    from datasets import Dataset

    from kubetune.components.train.data import flex_length

    assert [flex_length(n) for n in (1, 128, 129, 2048, 2049)] == [128, 128, 256, 2048, 2176]
    data = rows(37)
    plan = BatchPlan(len(data), 4, 0, 1, seed=5)
    loader = batch_loader(
        Dataset.from_list(data), plan, 0, 9, 0, "flex_attention", torch.float32, False, 128
    )
    for k, batch in enumerate(loader):
        chosen = [data[int(i)] for i in plan.rows(k)]
        assert batch["input_ids"].shape == (4, 128)
        assert batch["tokens"] == sum(len(r["input_ids"]) for r in chosen)
        for row, ids, labels, positions in zip(
            chosen, batch["input_ids"], batch["labels"], batch["position_ids"], strict=True
        ):
            n = len(row["input_ids"])
            assert ids[:n].tolist() == row["input_ids"] and bool((labels[n:] == -100).all())
            assert positions[n:].tolist() == list(range(128 - n))


def test_attention_selection():
    """auto: flex_attention for packed rows on CUDA (Falcon through kubetune's own path, not
    ALiBi Falcon), SDPA on the CPU and for unpacked rows; a recipe's explicit choice wins."""
    from kubetune.components.models import load_config
    from kubetune.components.train.attention import (
        attention_implementation,
        supports_flex_attention,
        transformers_attention,
    )

    for arch in ("llama", "falcon", "qwen2"):
        recipe = cfg(f"model.name_or_path=tiny://{arch}")
        assert attention_implementation(recipe, CUDA, packed=True) == "flex_attention"
        assert attention_implementation(recipe, CUDA, packed=False) == "sdpa"
        assert attention_implementation(recipe, CPU, packed=True) == "sdpa"
    falcon = load_config(cfg().model)
    falcon.alibi = True
    assert not supports_flex_attention(falcon)
    assert attention_implementation(cfg("model.attn_implementation=eager"), CUDA, True) == "eager"
    assert transformers_attention("flex_attention", "falcon") == "sdpa"
    assert transformers_attention("flex_attention", "llama") == "flex_attention"


def test_flash_attention_3_on_hopper_else_2(monkeypatch):
    import importlib.util

    from kubetune.components.train import attention

    installed = {"flash_attn", "flash_attn_interface"}
    real = importlib.util.find_spec
    monkeypatch.setattr(
        attention.importlib.util,
        "find_spec",
        lambda name, *a: object() if name in installed else real(name, *a),
    )
    for major, want in ((9, "flash_attention_3"), (8, "flash_attention_2")):
        monkeypatch.setattr(
            attention.torch.cuda, "get_device_capability", lambda d, m=major: (m, 0)
        )
        assert attention.attention_implementation(cfg(), CUDA, packed=True) == want
    installed.discard("flash_attn_interface")
    monkeypatch.setattr(attention.torch.cuda, "get_device_capability", lambda d: (9, 0))
    assert attention.attention_implementation(cfg(), CUDA, packed=True) == "flash_attention_2"


@pytest.mark.integration  # flex_attention compiles its kernel on the CPU (~20 s)
@pytest.mark.parametrize("arch", ["llama", "falcon", "falcon-40b"])
def test_flex_attention_document_mask_keeps_examples_apart(arch):
    """Packed rows through flex_attention with the document mask (transformers' flex path for
    Llama, kubetune's for both Falcon layouts) give each example its logits alone."""
    from kubetune.components.train.attention import transformers_attention, use_flex_attention
    from kubetune.components.train.data import document_block_mask, flex_length

    source = resolve_model(f"tiny://{arch}")
    model_type = "falcon" if arch.startswith("falcon") else arch
    model = AutoModelForCausalLM.from_pretrained(
        source, attn_implementation=transformers_attention("flex_attention", model_type)
    ).eval()
    use_flex_attention(model)
    reference = AutoModelForCausalLM.from_pretrained(source, attn_implementation="sdpa").eval()
    a, b = list(range(3, 10)), list(range(20, 25))
    row = {"input_ids": a + b, "labels": a + b, "position_ids": list(range(7)) + list(range(5))}
    short = {"input_ids": a, "labels": a, "position_ids": list(range(7))}
    batch = collate(
        [row, short], pad_id=1, attn="flex_attention", dtype=torch.float32, pad_to=flex_length(12)
    )
    mask = document_block_mask(batch["position_ids"])
    with torch.no_grad():
        packed = model(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], attention_mask=mask
        ).logits
        alone_a = reference(input_ids=torch.tensor([a])).logits[0]
        alone_b = reference(input_ids=torch.tensor([b])).logits[0]
    torch.testing.assert_close(packed[0, :7], alone_a, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(packed[0, 7:12], alone_b, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(packed[1, :7], alone_a, atol=1e-5, rtol=1e-4)
