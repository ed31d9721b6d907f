"""Training building blocks checked against independent references (bitsandbytes, plain
transformers forwards, the bytes of real tensors)."""

from __future__ import annotations

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import pytest
import torch
from safetensors.torch import load_file

from kubetune.components.architectures import family, linear_layer_names, quantized_linear_names
from kubetune.components.config import load_recipe
from kubetune.components.errors import UserError
from kubetune.components.models import resolve_model
from kubetune.components.tiny_models import ARCHITECTURES
from kubetune.components.train import checkpoint as ckpt
from kubetune.components.train.data import BatchPlan, collate
from kubetune.components.train.modeling import load_base

from .conftest import TINY_DEMO


def qlora_cfg(arch: str, bits: int = 4):
    return load_recipe(
        TINY_DEMO,
        [
            f"model.name_or_path=tiny://{arch}",
            "method=qlora",
            f"quant.bits={bits}",
            "quant.compute_dtype=float32",
        ],
    )


# transformers v5 fuses these families' experts into 3-D parameters (train/experts4bit.py)
FUSED_EXPERTS = {"mixtral", "qwen3-moe", "qwen3.5-moe"}
# QLoRA refuses gpt-oss: its experts (with biases) are not the SwiGLU kind kubetune quantizes
# (tests/test_train.py's test_sliding_window_families_train_with_lora)
QLORA_REFUSED = {"gpt-oss"}


@pytest.mark.parametrize("arch", sorted(set(ARCHITECTURES) - FUSED_EXPERTS - QLORA_REFUSED))
def test_qlora_quantizes_every_linear_layer(arch):
    """Every linear layer (Falcon's FalconLinear too) is a real bitsandbytes 4-bit layer whose
    dequantized weight is the checkpoint's weight within NF4 error."""
    from transformers import AutoModelForCausalLM

    model, quantized = load_base(qlora_cfg(arch), torch.device("cpu"))
    reference = AutoModelForCausalLM.from_pretrained(resolve_model(f"tiny://{arch}"))
    expected = linear_layer_names(reference)
    assert quantized == len(expected) > 0
    on_disk = load_file(f"{resolve_model(f'tiny://{arch}')}/model.safetensors")
    for name in expected:
        layer = model.get_submodule(name)
        assert isinstance(layer, bnb.nn.Linear4bit), name
        assert (
            layer.weight.dtype == torch.uint8
            and layer.weight.numel() * 2 == layer.in_features * layer.out_features
        )
        original = on_disk[f"{name}.weight"].float()
        restored = bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
        error = ((restored - original).norm() / original.norm()).item()
        # NF4 is ~9% on real-size blocks; bitsandbytes' CPU path is worse on tensors under
        # 4096 elements (the tiny models' 32x64 k/v projections), so allow up to 45% there.
        assert error < (0.15 if original.numel() >= 4096 else 0.45), (name, error)
    # the rest of the model is untouched
    assert torch.equal(
        model.get_input_embeddings().weight.float(), reference.get_input_embeddings().weight.float()
    )
    x = torch.tensor([[5, 6, 7, 8]])
    assert torch.isfinite(model(input_ids=x, labels=x).loss)


def test_qlora_8bit(tmp_path):
    model, quantized = load_base(qlora_cfg("llama", bits=8), torch.device("cpu"))
    assert quantized == 14
    assert all(
        m.weight.dtype == torch.int8 for m in model.modules() if isinstance(m, bnb.nn.Linear8bitLt)
    )


def test_qlora_refuses_a_model_left_unquantized(monkeypatch):
    """If linear layers escape quantization (as transformers does with FalconLinear), stop."""
    import kubetune.components.train.modeling as modeling

    real = modeling.replace_linear_layers
    monkeypatch.setattr(
        modeling,
        "replace_linear_layers",
        lambda model, names, cfg, dtype: real(model, names[1:], cfg, dtype),
    )
    with pytest.raises(UserError, match=r"only \d+ of \d+ linear layers were quantized"):
        load_base(qlora_cfg("falcon"), torch.device("cpu"))


@pytest.mark.parametrize("arch", sorted(FUSED_EXPERTS))
def test_qlora_quantizes_every_expert(arch):
    """A MoE model's fused 3-D experts (most of its weights) become one 4-bit layer per expert
    and projection, each the checkpoint's expert within NF4 error; what stays in the compute
    dtype is the router, embeddings, head, norms and biases only: the 4-bit elements are every
    quantizable element. The quantized model computes the reference's loss."""
    from transformers import AutoModelForCausalLM

    model, quantized = load_base(qlora_cfg(arch), torch.device("cpu"))
    reference = AutoModelForCausalLM.from_pretrained(resolve_model(f"tiny://{arch}"))
    layers = reference.model.layers
    experts = (
        reference.config.num_local_experts if arch == "mixtral" else reference.config.num_experts
    )
    assert quantized == len(quantized_linear_names(reference)) + len(layers) * experts * 2
    packed = sum(
        m.in_features * m.out_features for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)
    )
    head = reference.get_output_embeddings().weight
    kept = tuple(family(reference.config.model_type).unquantized)  # the router, slivers
    named = sum(p.numel() for n, p in reference.named_parameters() if n.endswith(kept))
    other = reference.get_input_embeddings().weight.numel() + head.numel() + named
    small = sum(p.numel() for p in reference.parameters() if p.ndim < 2)
    assert packed == sum(p.numel() for p in reference.parameters()) - other - small
    for index, layer in enumerate(layers):
        ours = model.model.layers[index].mlp.experts
        for e in range(experts):
            for mine, fused in ((ours.gate_up[e], layer.mlp.experts.gate_up_proj[e]),
                                (ours.down[e], layer.mlp.experts.down_proj[e])):  # fmt: skip
                assert isinstance(mine, bnb.nn.Linear4bit) and mine.weight.dtype == torch.uint8
                restored = bnbf.dequantize_4bit(mine.weight.data, mine.weight.quant_state)
                error = ((restored.float() - fused).norm() / fused.norm()).item()
                assert error < 0.15, (index, e, error)
    x = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])
    ours, theirs = model(input_ids=x, labels=x).loss, reference(input_ids=x, labels=x).loss
    assert ours.item() == pytest.approx(theirs.item(), rel=0.01)


@pytest.mark.parametrize("arch", sorted(FUSED_EXPERTS))
def test_qlora_refuses_experts_it_would_leave_in_full_precision(arch, monkeypatch):
    """With the expert path switched off, the fused 3-D experts are what bitsandbytes' layer
    swap leaves (most of the weights) in full precision without a word: the run stops before
    any weight is read, naming them and their share; the router, embeddings, norms and head are
    allowed to stay as they are."""
    from transformers import AutoModelForCausalLM

    import kubetune.components.train.modeling as modeling

    monkeypatch.setattr(modeling, "replace_fused_experts", lambda *a: 0)

    reference = AutoModelForCausalLM.from_pretrained(resolve_model(f"tiny://{arch}"))
    experts = {n: p.numel() for n, p in reference.named_parameters() if ".experts." in n}
    share = sum(experts.values()) / sum(p.numel() for p in reference.parameters())
    read = []
    monkeypatch.setattr(modeling, "_set_tensor", lambda *a: read.append(a[1]))
    with pytest.raises(UserError) as raised:
        load_base(qlora_cfg(arch), torch.device("cpu"))
    message = str(raised.value)
    assert f"{len(experts)} weights of model type" in message and f"{share:.0%}" in message
    assert sorted(experts)[0].rsplit(".", 1)[0] in message and "method=lora" in message
    assert "mlp.gate" not in message  # the router may stay in the compute dtype
    assert read == []


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ["falcon", "llama"])
def test_packed_rows_do_not_attend_across_examples(arch, attn):
    """A packed row's logits equal the logits of each example run alone."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        resolve_model(f"tiny://{arch}"), attn_implementation=attn
    ).eval()
    a, b = list(range(3, 10)), list(range(20, 25))
    row = {"input_ids": a + b, "labels": a + b, "position_ids": list(range(7)) + list(range(5))}
    short = {"input_ids": a, "labels": a, "position_ids": list(range(7))}
    batch = collate([row, short], pad_id=1, attn=attn, dtype=torch.float32)
    assert "attention_mask" in batch
    with torch.no_grad():
        packed = model(
            input_ids=batch["input_ids"],
            position_ids=batch["position_ids"],
            attention_mask=batch["attention_mask"],
        ).logits
        alone_a = model(input_ids=torch.tensor([a])).logits[0]
        alone_b = model(input_ids=torch.tensor([b])).logits[0]
    torch.testing.assert_close(packed[0, :7], alone_a, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(packed[0, 7:], alone_b, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(packed[1, :7], alone_a, atol=1e-5, rtol=1e-4)  # padded row


def test_batch_plan_shards_and_continues():
    plans = [BatchPlan(103, 4, rank, 2, seed=7) for rank in range(2)]
    assert plans[0].per_epoch == 12
    epoch0 = [set(p.rows(k)) for p in plans for k in range(12)]
    seen = set().union(*epoch0)
    assert sum(len(s) for s in epoch0) == len(seen) == 96  # disjoint across ranks and batches
    again = BatchPlan(103, 4, 1, 2, seed=7)
    assert [again.rows(k).tolist() for k in (30, 5)] == [
        plans[1].rows(30).tolist(),
        plans[1].rows(5).tolist(),
    ]


def test_optimizer_state_round_trips_through_safetensors_and_json(tmp_path):
    import json

    from safetensors.torch import load_file, save_file

    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    tensors: dict = {}
    skeleton = ckpt.flatten(opt.state_dict(), tensors, "optim")
    save_file(tensors, str(tmp_path / "s.safetensors"))
    (tmp_path / "s.json").write_text(json.dumps(skeleton))
    restored = ckpt.unflatten(
        json.loads((tmp_path / "s.json").read_text()), load_file(str(tmp_path / "s.safetensors"))
    )
    original = opt.state_dict()
    assert restored["param_groups"] == original["param_groups"]
    for index, values in original["state"].items():
        for key, value in values.items():
            assert torch.equal(restored["state"][index][key], value)


def test_flop_counter_and_profiler_are_refused_together_and_must_fit():
    from kubetune.components.train.measure import check_fits

    from .conftest import assert_user_error, run_cli

    both = run_cli(
        "config",
        TINY_DEMO,
        "--set",
        "train.flop_counter.start_step=2",
        "--set",
        "train.profile.active=2",
    )
    assert_user_error(both, "train.flop_counter and train.profile")
    cfg = load_recipe(TINY_DEMO, ["train.flop_counter.start_step=5"])
    check_fits(cfg, 6)  # step 5 counted, step 6 timed
    with pytest.raises(UserError, match="start_step=5: the run has 5 steps"):
        check_fits(cfg, 5)
    cfg = load_recipe(TINY_DEMO, ["train.profile.wait=1", "train.profile.active=3"])
    check_fits(cfg, 6)
    with pytest.raises(UserError, match=r"train.profile needs 6 steps \(wait 1 \+ warmup 2"):
        check_fits(cfg, 5)


def test_a_worker_error_is_kept_whole_or_not_at_all(tmp_path):
    """Two ranks fail with a user error and the launcher terminates the slower one: the error
    file holds the first rank's whole line, and a rank killed while writing leaves no empty file
    for the launcher to show as the error (CI once printed a bare 'error: ')."""
    import signal
    import subprocess
    import sys

    from kubetune.components.train.entry import ERROR_FILE
    from kubetune.components.train.worker import keep_error

    killed = (
        "import os, signal, pathlib\n"
        "from kubetune.components.train.worker import keep_error\n"
        "def dies_while_writing(self, text, *a, **k):\n"
        "    open(self, 'w').close()\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "pathlib.Path.write_text = dies_while_writing\n"
        f"keep_error(pathlib.Path({str(tmp_path)!r}), 'never seen')\n"
    )
    done = subprocess.run([sys.executable, "-c", killed], timeout=120)
    assert done.returncode == -signal.SIGKILL
    assert not (tmp_path / ERROR_FILE).exists()
    keep_error(tmp_path, "rank 1: the first error")
    keep_error(tmp_path, "rank 0: the second error")
    assert (tmp_path / ERROR_FILE).read_text() == "rank 1: the first error\n"
    leftover = {p.name for p in tmp_path.iterdir()} - {ERROR_FILE}
    assert all(name.startswith(f"{ERROR_FILE}.") for name in leftover) and len(leftover) == 1


def test_an_mxfp4_gpt_oss_checkpoint_loads_dequantized_for_training(tmp_path):
    """gpt-oss as OpenAI publishes it (experts MXFP4: tests/mxfp4.py): the base LoRA trains on
    holds every expert weight as transformers' own dequantization of the checkpoint's blocks,
    as an ordinary trainable-shaped tensor (not transformers' MXFP4 layer, which has no
    backward)."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from kubetune.components.models import load_config
    from kubetune.components.train.modeling import dequantized_for_training

    from .mxfp4 import mxfp4_copy

    folder = mxfp4_copy(resolve_model("tiny://gpt-oss"), tmp_path / "gpt-oss-mxfp4")
    cfg = load_recipe(TINY_DEMO, [f"model.name_or_path={folder}"])
    # transformers dequantizes on a CPU by itself; on a GPU it would keep its MXFP4 layers
    assert dequantized_for_training(load_config(cfg.model))["quantization_config"].dequantize
    assert dequantized_for_training(load_config(load_recipe(TINY_DEMO).model)) == {}
    model, _ = load_base(cfg, torch.device("cpu"))
    on_disk = load_file(str(folder / "model.safetensors"))
    for i, layer in enumerate(model.model.layers):
        experts = layer.mlp.experts
        assert type(experts).__name__ == "GptOssExperts"
        for part in ("gate_up_proj", "down_proj"):
            key = f"model.layers.{i}.mlp.experts.{part}"
            want = convert_moe_packed_tensors(on_disk[f"{key}_blocks"], on_disk[f"{key}_scales"])
            torch.testing.assert_close(getattr(experts, part).float(), want.float())
