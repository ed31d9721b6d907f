"""The speed model (`kubetune plan`'s step time, wall time and cost): every term against what
torch counts on tiny models or the tensors' own sizes, the calibration against its points, and
the CLI and the training run's recorded prediction end to end."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import torch

from kubetune.components.config import load_recipe
from kubetune.components.planner.architecture import architecture
from kubetune.components.planner.efficiency import CALIBRATION
from kubetune.components.planner.speed import (
    ADAMW_BYTES,
    EXPERT_OPS,
    LAYER_OPS,
    LORA_OPS,
    Efficiency,
    Setup,
    step_time,
    work,
)

from .conftest import REPO, TINY_DEMO, assert_user_error, run_cli

POINTS = REPO / "docs" / "benchmarks" / "speed-calibration.json"


def tiny_cfg(model: str, *sets: str):
    return load_recipe(TINY_DEMO, [f"model.name_or_path={model}", *sets])


def tiny_model(cfg, layers: int | None = None, attention: str = "sdpa"):
    from transformers import AutoModelForCausalLM

    from kubetune.components.models import load_config

    config = load_config(cfg.model)
    if layers is not None:
        config.num_hidden_layers = layers
    config._attn_implementation = attention
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.train()
    return model


def with_lora(model, cfg):
    from peft import LoraConfig, get_peft_model

    from kubetune.components.methods.lora import lora_targets

    targets = lora_targets(cfg, model.config.model_type)
    return get_peft_model(
        model, LoraConfig(r=cfg.lora.r, lora_alpha=16, lora_dropout=0.1, target_modules=targets)
    )


def setup_for(arch, method: str, batch: int, seq: int, checkpointed: int, **more) -> Setup:
    more = {"quant_bits": 0, "gpus": 1, "procs_per_node": 1, **more}
    return Setup(
        micro_batch=batch,
        row_len=seq,
        span=seq,
        grad_accum=1,
        method=method,
        checkpointed=checkpointed,
        **more,
    )


@pytest.mark.parametrize("model", ["tiny://llama", "tiny://falcon"])
@pytest.mark.parametrize("method", ["lora", "full"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_flops_match_torch_flop_counter(model, method, checkpointing):
    """Matmul + attention FLOPs of a forward and backward (and the recomputation) are what
    torch.utils.flop_counter counts on the real model."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = tiny_cfg(model, f"method={method}")
    arch = architecture(cfg)
    net = tiny_model(cfg, attention="eager")  # flop_counter does not count CPU SDPA's kernel
    if method == "lora":
        net = with_lora(net, cfg)
    if checkpointing:
        net.gradient_checkpointing_enable({"use_reentrant": False})
        net.enable_input_require_grads()
    batch, seq = 2, 96
    ids = torch.randint(0, arch.vocab, (batch, seq))
    counter = FlopCounterMode(display=False)
    with counter:
        net(input_ids=ids, labels=ids).loss.backward()
    counted = counter.get_total_flops()
    setup = setup_for(
        arch, method, batch, seq, arch.layers if checkpointing else 0, dense_attention=True
    )
    predicted = work(arch, setup).counted_flops
    # With LoRA and no checkpointing, autograd skips the input gradient of the projections that
    # read the frozen embedding (layer 0's query/key/value, and Falcon's parallel MLP): 1/layers
    # of them, 3-6% of these 2-layer models' FLOPs, under 0.4% of a 32-layer one's. The model
    # counts them.
    lenient = method == "lora" and not checkpointing
    assert predicted == pytest.approx(counted, rel=0.06 if lenient else 0.005), (
        predicted,
        counted,
    )


def test_layers_below_the_lowest_trained_one_run_no_backward():
    """train.freeze_layers (and LLaMA-Adapter's start_layer): the layers below the lowest
    trained one compute no input gradients and no attention backward, as torch's flop counter
    sees; their backward ops are not dispatched either."""
    from torch.utils.flop_counter import FlopCounterMode

    from kubetune.components.methods.full import freeze_bottom

    cfg = tiny_cfg("tiny://llama", "method=full", "train.freeze_layers=1")
    arch = architecture(cfg)
    assert arch.frozen_layers == 1
    net = tiny_model(cfg, attention="eager")
    freeze_bottom(net, 1)
    ids = torch.randint(0, arch.vocab, (2, 96))
    counter = FlopCounterMode(display=False)
    with counter:
        net(input_ids=ids, labels=ids).loss.backward()
    setup = setup_for(arch, "full", 2, 96, 0, dense_attention=True)
    assert work(arch, setup).counted_flops == pytest.approx(counter.get_total_flops(), rel=0.005)
    whole = architecture(tiny_cfg("tiny://llama", "method=full"))
    frozen_ops, all_ops = work(arch, setup).ops, work(whole, setup).ops
    assert all_ops - frozen_ops == pytest.approx(LAYER_OPS["llama"][1])  # one layer
    for method, frozen in (("adapter", 1), ("adapter_v2", 0)):  # v2 trains every layer's norms
        prompted = tiny_cfg("tiny://llama", f"method={method}", "adapter.start_layer=1")
        assert architecture(prompted).frozen_layers == frozen, method


def pinned_version(name: str) -> str:
    """images/constraints.txt's version of a package."""
    for line in (REPO / "images" / "constraints.txt").read_text().splitlines():
        if line.startswith(f"{name}=="):
            return line.split("==")[1]
    raise KeyError(name)


def dispatched_ops(net, ids) -> tuple[int, int]:
    """The aten ops a forward and a backward of `net` on `ids` dispatch."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += 1
            return func(*args, **(kwargs or {}))

    mode = Count()
    with mode:
        loss = net(input_ids=ids, labels=ids).loss
    forward = mode.n
    with mode:
        loss.backward()
    return forward, mode.n - forward


def test_ops_per_layer_match_the_dispatched_ops():
    """LAYER_OPS, LORA_OPS and ADAPTER_OPS are the aten ops a decoder layer dispatches (forward,
    backward), recounted here: the difference between a 4-layer and a 2-layer model."""
    from kubetune.components.methods.llama_adapter import AdapterSpec, install
    from kubetune.components.planner.speed import ADAPTER_OPS

    def per_layer(cfg, lora: bool):
        counts = []
        for layers in (2, 4):
            net = tiny_model(cfg, layers)
            if lora:
                net = with_lora(net, cfg)
            if cfg.method.startswith("adapter"):  # kubetune's modules on a frozen base
                net.requires_grad_(False)
                install(net, AdapterSpec.from_recipe(cfg))
            counts.append(dispatched_ops(net, torch.randint(0, 100, (2, 32))))
        (f2, b2), (f4, b4) = counts
        return (f4 - f2) / 2, (b4 - b2) / 2

    import transformers

    pinned = pinned_version("transformers")
    for model, family in (("tiny://llama", "llama"), ("tiny://falcon", "falcon")):
        cfg = tiny_cfg(model, "method=lora")
        forward, backward = per_layer(cfg, lora=False)
        if transformers.__version__ != pinned and (forward, backward) != pytest.approx(
            LAYER_OPS[family], rel=0.1
        ):  # the counts are the pinned transformers' (the images'), which the plan describes
            pytest.skip(
                f"transformers {transformers.__version__} dispatches {forward:g}/{backward:g} "
                f"ops per {family} layer (forward/backward); LAYER_OPS counts the pinned "
                f"{pinned}'s {LAYER_OPS[family][0]}/{LAYER_OPS[family][1]}"
            )
        assert forward == pytest.approx(LAYER_OPS[family][0], rel=0.1), (model, forward)
        assert backward == pytest.approx(LAYER_OPS[family][1], rel=0.1), (model, backward)
        lora_f, lora_b = per_layer(cfg, lora=True)
        adapted = architecture(cfg).adapted_modules / architecture(cfg).layers
        assert (lora_f - forward) / adapted == pytest.approx(LORA_OPS["peft"][0], rel=0.15)
        assert (lora_b - backward) / adapted == pytest.approx(LORA_OPS["peft"][1], rel=0.15)
        for method, (extra_f, extra_b) in ADAPTER_OPS[family].items():
            prompted = tiny_cfg(model, f"method={method}", "adapter.start_layer=0")
            adapter_f, adapter_b = per_layer(prompted, lora=False)
            assert adapter_f == pytest.approx(forward + extra_f, rel=0.05), (model, method)
            assert adapter_b == pytest.approx(backward + extra_b, rel=0.05), (model, method)


def test_expert_ops_match_the_dispatched_ops():
    """EXPERT_OPS is what each routed expert's call in transformers' eager experts loop (the
    one a 4-bit base's Experts4bit runs) dispatches (forward, backward): the difference between
    8 and 4 experts per layer, every expert getting tokens, recounted on tiny://qwen3-moe."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from transformers import AutoModelForCausalLM

    from kubetune.components.models import load_config

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += 1
            return func(*args, **(kwargs or {}))

    def ops(experts: int) -> tuple[int, int]:
        config = load_config(tiny_cfg("tiny://qwen3-moe").model)
        config.num_experts = experts
        config._experts_implementation = "eager"
        torch.manual_seed(0)
        net = AutoModelForCausalLM.from_config(config)
        return dispatched_ops(net, torch.randint(0, 100, (2, 64)))

    (f4, b4), (f8, b8) = ops(4), ops(8)
    layers = 2
    assert (f8 - f4) / (4 * layers) == pytest.approx(EXPERT_OPS[0], rel=0.1)
    assert (b8 - b4) / (4 * layers) == pytest.approx(EXPERT_OPS[1], rel=0.1)


def test_a_moe_models_matmuls_are_its_active_ones():
    """The speed model multiplies what one token passes through: Qwen3-30B-A3B's attention and
    8 of its 128 experts per layer (from the published shapes), and LoRA's pairs likewise."""
    cfg = load_recipe(REPO / "pipelines/recipes/qwen3-30b-a3b-qlora.yaml")
    arch = architecture(cfg)
    attention = 2 * 2048 * 4096 + 2 * 2048 * 512  # q, o; k, v
    expert = 3 * 2048 * 768  # gate, up, down
    assert arch.matmul_params == 48 * (attention + 8 * expert)
    pairs = 8 * ((2048 + 2 * 768) + (768 + 2048))  # r=8 on gate_up and down, per expert
    assert arch.adapter_matmul_params == arch.adapter_params - 48 * 120 * pairs
    assert (arch.experts, arch.moe_layers) == (128, 48)


def test_bytes_match_the_tensors():
    """4-bit weights, AdamW's traffic and the gradient all-reduce against real tensors."""
    import bitsandbytes.functional as bnbf

    cfg = tiny_cfg("tiny://llama", "method=qlora")
    arch = architecture(cfg)
    # NF4 with double quantization: packed weights + 8-bit absmax + its fp32 absmax per 256
    weight = torch.randn(256, 1024)
    packed, state = bnbf.quantize_4bit(
        weight, blocksize=64, quant_type="nf4", compress_statistics=True
    )
    stored = packed.nbytes + state.absmax.nbytes + state.state2.absmax.nbytes
    setup = setup_for(arch, "qlora", 1, 64, 0, quant_bits=4)
    w = work(arch, setup)
    per_param = w.bytes["dequantize"] / (arch.linear_params * 2) - 2  # two passes, bf16 out
    assert per_param * weight.numel() == pytest.approx(stored, rel=0.01)
    # AdamW: reads p, g, m, v and writes p, m, v of every trained fp32 tensor
    net = with_lora(tiny_model(cfg), cfg)
    trained = [p for p in net.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trained) == arch.adapter_params
    ids = torch.randint(0, arch.vocab, (2, 16))
    net(input_ids=ids, labels=ids).loss.backward()
    optimizer = torch.optim.AdamW(trained)
    optimizer.step()
    moments = [t for p in trained for t in optimizer.state[p].values() if t.dim()]
    reads = sum(p.nbytes + p.grad.nbytes for p in trained) + sum(t.nbytes for t in moments)
    writes = sum(p.nbytes for p in trained) + sum(t.nbytes for t in moments)
    assert w.step_bytes == reads + writes == arch.adapter_params * ADAMW_BYTES[4]
    # DDP's ring all-reduce sends 2 (g - 1) / g of the gradients from each GPU
    ddp = work(arch, dataclasses.replace(setup, gpus=4, procs_per_node=4))
    grads = sum(p.grad.nbytes for p in trained)
    assert ddp.comm["all-reduce gradients"] == pytest.approx(2 * 3 / 4 * grads)
    # LoRA's traffic: its dropout copy of every adapted layer's input and the A/B outputs
    from peft.tuners.lora import LoraLayer

    layers = [m for m in net.modules() if isinstance(m, LoraLayer)]
    features = sum(m.in_features + m.out_features for m in layers)
    assert len(layers) == arch.adapted_modules and features == arch.adapted_features
    assert w.bytes["lora"] == 64 * features * 2 * 3
    # without dropout (p = 0: peft's and torchtune's identity) no copy of the input: B's output
    undropped = work(arch, dataclasses.replace(setup, lora_dropout=False))
    assert undropped.bytes["lora"] == w.bytes["lora"] / 2
    # FSDP (LoRA on bf16 weights, 4 GPUs): each micro batch gathers the other 3/4 of every
    # weight, in the forward and again in the backward
    bf16 = tiny_model(tiny_cfg("tiny://llama", "method=lora")).to(torch.bfloat16)
    weight_bytes = sum({id(p): p.nbytes for p in bf16.parameters()}.values())
    lora_arch = architecture(tiny_cfg("tiny://llama", "method=lora"))
    fsdp = work(
        lora_arch,
        setup_for(lora_arch, "lora", 1, 64, 0, gpus=4, procs_per_node=4, strategy="fsdp"),
    )
    assert fsdp.comm_per_micro["all-gather weights"] == pytest.approx(2 * 3 / 4 * weight_bytes)
    # the logits: a bf16 row of vocab per token, written and read with its fp32 upcast and its
    # gradient (transformers' loss: 10x the bf16 tensor's bytes; chunked: 6x)
    with torch.no_grad():
        logits = bf16(input_ids=torch.randint(0, arch.vocab, (1, 64))).logits
    assert logits.dtype == torch.bfloat16
    assert w.bytes["logits"] == 10 * logits.nbytes
    chunked = work(arch, dataclasses.replace(setup, loss="chunked"))
    assert chunked.bytes["logits"] == 6 * logits.nbytes


def test_time_terms_follow_the_gpu_tables():
    """Step time = the power mean of GPU work (FLOPs at the efficiency's share of the peak,
    bytes at its share of HBM bandwidth) and host ops; more GPUs add the exposed all-reduce."""
    cfg = tiny_cfg("tiny://llama", "method=lora")
    arch = architecture(cfg)
    setup = setup_for(arch, "lora", 4, 512, 0)
    from kubetune.components.planner.gpus import GPU_TYPES

    gpu = GPU_TYPES["H100-80GB"]
    eff = Efficiency(matmul=0.5, memory=0.5, op_seconds=1e-5, overlap=1.0)
    w = work(arch, setup)
    t = step_time(arch, setup, gpu, eff)
    hbm, peak = gpu.hbm_bytes_s * 0.5, gpu.matmul_flops * 0.5
    matmul = w.matmul_flops / peak
    # a GEMM streams its weights while it computes: they add only beyond the matmuls' time
    streamed = max(0.0, w.bytes["weights"] / hbm - matmul)
    others = sum(b for name, b in w.bytes.items() if name != "weights") / hbm
    expected_gpu = matmul + 0.5 * w.attention_flops / peak + others + streamed
    assert t.gpu_seconds == pytest.approx(expected_gpu)
    assert t.parts["weights (per micro batch)"] == pytest.approx(streamed)
    short = setup_for(arch, "lora", 1, 4, 0)  # 4 tokens: bound by the weights' bytes
    ws, ts = work(arch, short), step_time(arch, short, gpu, eff)
    assert ts.parts["matmul (per micro batch)"] + ts.parts[
        "weights (per micro batch)"
    ] == pytest.approx(ws.bytes["weights"] / hbm)
    # peft's k-bit preparation upcasts the weights: autocast's cast kernels (fp32 read, bf16
    # written) run beside the GEMMs, not inside them
    upcast = dataclasses.replace(setup, upcast=True)
    wu, tu = work(arch, upcast), step_time(arch, upcast, gpu, eff)
    assert wu.bytes["weight casts"] == (wu.bytes["weights"] / 2) * 6
    assert tu.parts["weight casts (per micro batch)"] == pytest.approx(
        wu.bytes["weight casts"] / hbm
    )
    assert t.host_seconds == pytest.approx(w.ops * 1e-5)
    assert t.micro_seconds == pytest.approx(expected_gpu + w.ops * 1e-5)  # p = 1: the sum
    slower = step_time(arch, setup, GPU_TYPES["A100-80GB"], eff)
    assert slower.gpu_seconds > t.gpu_seconds and slower.host_seconds == t.host_seconds
    assert t.tokens_per_second == pytest.approx(4 * 512 / t.step_seconds)


def test_packed_rows_under_sdpa_attend_every_score_of_the_row():
    """transformers gives SDPA a dense block-diagonal mask for packed position ids (no causal
    kernel skips a masked block: every score of the row is computed) and none for one example a
    row (SDPA's causal kernel); the plan reads which the worker runs from the recipe, and the
    speed model times dense attention over the whole score matrix at its own share of the peak,
    a causal or block-sparse kernel over half of it at the matmuls' share."""
    from transformers import LlamaConfig
    from transformers.masking_utils import create_causal_mask

    from kubetune.components.planner.forecast import dense_attention
    from kubetune.components.planner.gpus import GPU_TYPES

    config = LlamaConfig(
        hidden_size=64, num_attention_heads=4, num_hidden_layers=1, intermediate_size=128
    )
    config._attn_implementation = "sdpa"

    def mask(position_ids):
        return create_causal_mask(
            config=config,
            inputs_embeds=torch.zeros(1, 12, 64),
            attention_mask=None,
            past_key_values=None,
            position_ids=position_ids,
        )

    packed = mask(torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4, 0, 1, 2]]))
    assert packed is not None and tuple(packed.shape[-2:]) == (12, 12)
    assert not packed[0, 0, 5, 2] and packed[0, 0, 5, 4]  # the second example sees only itself
    assert mask(torch.arange(12)[None]) is None  # one example: SDPA's is_causal kernel

    for attn, packing, dense in (
        ("sdpa", "true", True),  # the CPU fallback's dense mask, transformers' packed SDPA
        ("sdpa", "false", False),
        ("eager", "false", True),
        ("auto", "true", False),  # Llama's flex_attention document mask on a GPU
        ("flash_attention_2", "true", False),
    ):
        cfg = tiny_cfg(
            "tiny://llama", f"model.attn_implementation={attn}", f"data.packing={packing}"
        )
        assert dense_attention(cfg, architecture(cfg)) is dense, (attn, packing)

    arch = architecture(tiny_cfg("tiny://llama", "method=lora"))
    causal = setup_for(arch, "lora", 2, 256, 0)
    full = dataclasses.replace(causal, dense_attention=True)
    eff = Efficiency(matmul=0.5, memory=0.5, op_seconds=1e-5, overlap=1.0, dense=0.1)
    gpu = GPU_TYPES["H100-80GB"]
    flops = work(arch, causal).attention_flops
    key = "attention (per micro batch)"
    assert step_time(arch, causal, gpu, eff).parts[key] == pytest.approx(
        flops * 0.5 / (gpu.matmul_flops * 0.5)
    )
    assert step_time(arch, full, gpu, eff).parts[key] == pytest.approx(
        flops / (gpu.matmul_flops * 0.1)
    )


def test_stack_op_tables_count_a_frozen_layer_under_an_adapter():
    """Other stacks' LoRA ops are counted over their frozen layer (benchmarks/count_stack_ops.py),
    so an adapter run on them takes the frozen layer's backward, full fine-tuning the trained
    one's; transformers' LORA_OPS are counted over the trained layer's. lit-gpt's LLaMA-Adapter
    modules add their own ops in every layer."""
    from kubetune.components.planner.speed import layer_ops
    from kubetune.components.planner.stacks import (
        LIT_GPT_ADAPTER_OPS,
        LIT_GPT_FROZEN_OPS,
        LIT_GPT_LORA_OPS,
        LITGPT_FROZEN_OPS,
        LITGPT_LORA_OPS,
        LITGPT_OPS,
    )

    arch = architecture(tiny_cfg("tiny://llama", "method=lora"))
    adapted = arch.adapted_modules / arch.layers
    for stack, frozen, per_lora in (
        ("litgpt", LITGPT_FROZEN_OPS["llama"], LITGPT_LORA_OPS["llama"]),
        ("lit-gpt", LIT_GPT_FROZEN_OPS["llama"], LIT_GPT_LORA_OPS["llama"]),
    ):
        lora = setup_for(arch, "lora", 1, 64, 0, stack=stack, lora="peft")
        assert layer_ops(arch, lora) == pytest.approx(
            tuple(f + adapted * a for f, a in zip(frozen, per_lora, strict=True))
        )
    whole = architecture(tiny_cfg("tiny://llama", "method=full"))
    full = setup_for(whole, "full", 1, 64, 0, stack="litgpt")
    assert layer_ops(whole, full) == pytest.approx(LITGPT_OPS["llama"])
    ours = setup_for(arch, "lora", 1, 64, 0, lora="peft")
    assert layer_ops(arch, ours) == pytest.approx(
        tuple(f + adapted * a for f, a in zip(LAYER_OPS["llama"], LORA_OPS["peft"], strict=True))
    )
    for method in ("adapter", "adapter_v2"):
        prompted = architecture(
            tiny_cfg("tiny://llama", f"method={method}", "adapter.start_layer=0")
        )
        setup = setup_for(prompted, method, 1, 64, 0, stack="lit-gpt")
        assert layer_ops(prompted, setup) == pytest.approx(
            tuple(
                f + a
                for f, a in zip(
                    LIT_GPT_FROZEN_OPS["llama"], LIT_GPT_ADAPTER_OPS["llama"][method], strict=True
                )
            )
        )


def test_lit_gpt_lora_converts_its_index_list_and_waits_for_the_gpu():
    """lit-gpt's LoRA on query and value builds its padding index from a Python list in every
    forward (the adapted projections' output features) and copies it to the GPU synchronously:
    host seconds beside its ops, and host and GPU time add whatever the fitted overlap."""
    from kubetune.components.planner.gpus import GPU_TYPES
    from kubetune.components.planner.stacks import INDEX_LIST_SECONDS

    arch = architecture(tiny_cfg("tiny://llama", "method=lora"))
    lit = setup_for(arch, "lora", 1, 64, 0, stack="lit-gpt", lora="peft")
    w = work(arch, lit)
    out_features = arch.adapted_features / 2  # q and v of the tiny Llama: in = out
    assert w.host_seconds == pytest.approx(INDEX_LIST_SECONDS * out_features)
    assert w.synchronous
    eff = Efficiency(matmul=0.5, memory=0.5, op_seconds=1e-5, overlap=4.0)
    t = step_time(arch, lit, GPU_TYPES["A100-40GB"], eff)
    assert t.host_seconds == pytest.approx(w.ops * 1e-5 + w.host_seconds)
    assert t.micro_seconds == pytest.approx(t.gpu_seconds + t.host_seconds)
    for other in ("litgpt", "transformers"):  # litgpt 0.2+ caches the index as a buffer
        setup = dataclasses.replace(lit, stack=other)
        assert work(arch, setup).host_seconds == 0 and not work(arch, setup).synchronous
        t = step_time(arch, setup, GPU_TYPES["A100-40GB"], eff)
        assert t.micro_seconds < t.gpu_seconds + t.host_seconds


def test_compiled_layers_and_bitsandbytes_dequantization_take_their_own_shares():
    """A compiled layer's activation traffic at e_compiled of HBM (an eager one's at e_memory,
    eager_traffic times), bitsandbytes' 4-bit dequantization at e_dequant (torchtune's torchao
    NF4 at e_memory); without a fitted share, memory's."""
    from kubetune.components.planner.gpus import GPU_TYPES

    gpu = GPU_TYPES["A100-80GB"]
    hbm = gpu.hbm_bytes_s
    lora = architecture(tiny_cfg("tiny://llama", "method=lora"))
    qlora = architecture(tiny_cfg("tiny://llama", "method=qlora"))
    eff = Efficiency(0.5, 0.4, 1e-5, 1.0, eager_traffic=3.0, compiled=0.8, dequant=0.2)
    eager = setup_for(lora, "lora", 2, 256, 0)
    compiled = dataclasses.replace(eager, compiled=True)
    for setup, share in ((eager, 0.4 / 3.0), (compiled, 0.8)):
        t = step_time(lora, setup, gpu, eff)
        expected = work(lora, setup).bytes["activations"] / (hbm * share)
        assert t.parts["activations (per micro batch)"] == pytest.approx(expected)
    four = setup_for(qlora, "qlora", 2, 256, 0, quant_bits=4)
    for stack, share in (("transformers", 0.2), ("lit-gpt", 0.2), ("torchtune", 0.4)):
        setup = dataclasses.replace(four, stack=stack)
        t = step_time(qlora, setup, gpu, eff)
        expected = work(qlora, setup).bytes["dequantize"] / (hbm * share)
        assert t.parts["dequantize (per micro batch)"] == pytest.approx(expected), stack
    prior = Efficiency(0.5, 0.4, 1e-5, 1.0)
    assert prior.compiled_share == prior.dequant_share == 0.4


def test_llm_int8s_backward_multiplies_in_its_inputs_dtype():
    """bitsandbytes' MatMul8bitLt copies the int8 weight to its input's dtype for the input
    gradient and multiplies outside autocast: under peft's fp32 upcast (an fp32 residual stream)
    a float32 matmul, which the model times on the CUDA cores' FP32 peak, for every 8-bit layer
    but attention's output projection (SDPA's 16-bit output feeds it)."""
    import bitsandbytes as bnb
    from torch.utils._python_dispatch import TorchDispatchMode

    from kubetune.components.planner.gpus import GPU_TYPES

    class Matmuls(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.dtypes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm):
                self.dtypes.append({a.dtype for a in args if isinstance(a, torch.Tensor)})
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    dense = torch.nn.Linear(64, 32, bias=False)
    layer = bnb.nn.Linear8bitLt(64, 32, bias=False, has_fp16_weights=False, threshold=6.0)
    layer.load_state_dict(dense.state_dict())
    layer = layer.to("cpu")
    assert layer.weight.dtype == torch.int8
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(2, 8, 64, dtype=dtype, requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x)
        seen = Matmuls()
        with seen:
            y.float().sum().backward()
        assert seen.dtypes == [{dtype}], (dtype, seen.dtypes)
    cfg = tiny_cfg("tiny://llama", "method=qlora", "quant.bits=8")
    arch = architecture(cfg)
    eight = setup_for(arch, "qlora", 2, 64, 0, quant_bits=8)
    upcast = dataclasses.replace(eight, upcast=True)
    assert (
        work(arch, eight).fp32_flops
        == 0
        == work(arch, dataclasses.replace(upcast, quant_bits=4)).fp32_flops
    )
    w, w16 = work(arch, upcast), work(arch, eight)
    out_proj = arch.hidden**2 * arch.layers
    assert w.fp32_flops == 2 * 128 * (arch.linear_params - out_proj)
    assert w.fp32_flops + w.flops["backward"] == w16.flops["backward"]
    assert w.counted_flops == w16.counted_flops
    eff = Efficiency(0.5, 0.4, 1e-5, 1.0)
    for name in ("A100-80GB", "RTXA6000-48GB"):
        gpu = GPU_TYPES[name]
        t = step_time(arch, upcast, gpu, eff)
        assert t.parts["fp32 matmul (per micro batch)"] == pytest.approx(
            w.fp32_flops / (gpu.fp32_flops * 0.5)
        )
    assert all(g.fp32_flops > 0 for g in GPU_TYPES.values())


def test_the_plan_counts_lora_dropout_only_where_it_runs():
    """planned_setup (what `plan` and the calibration points run) takes lora.dropout: p = 0
    (torchtune's recipes, many current ones) copies no input."""
    from kubetune.components.planner.calibration import recipe_point

    for dropout, runs in ((0.0, False), (0.05, True)):
        raw = {"recipe": {"model": {"name_or_path": "tiny://llama"}, "method": "lora"}}
        raw["recipe"]["lora"] = {"dropout": dropout}
        _, setup = recipe_point(raw)
        assert setup.lora_dropout is runs


@pytest.mark.integration
def test_calibration_lands_near_its_points_and_refits_to_the_stored_values():
    """In sample, at least 80% of the fitted points within 30%; the terms the published runs
    show: LLM.int8 at Lambda's 0.32-0.43x of 4-bit on an A100 (0.79x on an RTX A6000), the
    A100-80GB faster than the A100-40GB by its bandwidth (published 1.29x); and the refit
    script reproduces the stored efficiencies, band and coverage, with the leave-one-source-out
    table, whose share within 30% out of sample is at least 80%."""
    from kubetune.components.planner.calibration import load_points

    eff = Efficiency.load()
    points = load_points(POINTS)
    fitted = [p for p in points if p.fit]
    assert len({p.publication for p in fitted}) >= 4
    within = [p.name for p in fitted if abs(p.error(eff)) <= 0.3]
    assert len(within) >= 0.8 * len(fitted), [(p.name, p.error(eff)) for p in fitted]
    lam = {
        (p.gpu, p.setup.gpus, p.setup.quant_bits, p.arch.layers): p
        for p in points
        if p.publication.startswith("Lambda")
    }
    for gpus, layers in ((1, 32), (8, 32), (1, 60)):
        four, eight = (lam["A100-80GB", gpus, bits, layers].predicted(eff) for bits in (4, 8))
        assert 0.25 <= eight / four <= 0.5, (gpus, layers, eight / four)
    # the RTX A6000 loses far less to 8-bit (published 0.79x): its FP32 peak is twice the A100's
    four, eight = (lam["RTXA6000-48GB", 1, bits, 32].predicted(eff) for bits in (4, 8))
    assert eight / four >= 0.65
    a100 = [lam[gpu, 1, 4, 32].predicted(eff) for gpu in ("A100-80GB", "A100-40GB")]
    assert a100[0] / a100[1] >= 1.15
    check = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "fit_speed_model.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert check.returncode == 0, check.stderr
    assert "left-out error" in check.stdout and "| publication: Lambda" in check.stdout
    # issue 40's goal, out of sample (--check has just recomputed the stored band)
    assert json.loads(CALIBRATION.read_text())["band"]["within_30_percent"] >= 0.8


def test_leave_one_source_out_leaves_each_publication_out_whole(monkeypatch):
    """Each out-of-sample fit lacks every point of exactly one publication and has all the
    others; the band is the quantiles of measured / predicted over those errors."""
    from kubetune.components.planner import calibration

    points = calibration.load_points(POINTS)
    publications = {p.publication for p in points if p.fit}
    seen = []

    def recording_fit(subset):
        seen.append({p.publication for p in subset})
        return Efficiency.load()

    monkeypatch.setattr(calibration, "fit", recording_fit)
    errors = calibration.leave_one_out(points)
    everything = {p.publication for p in points}
    assert sorted(map(sorted, (everything - s for s in seen))) == sorted([x] for x in publications)
    assert set(errors) == {p.name for p in points if p.fit}
    band = calibration.band({"a": 0.0, "b": 1.0, "c": -0.5})  # ratios 1, 0.5, 2
    assert band["low"] == pytest.approx(0.6) and band["high"] == pytest.approx(1.8)
    assert (
        band["within_30_percent"] == pytest.approx(1 / 3, abs=1e-3)
        and band["median_abs_error"] == 0.5
    )


@pytest.mark.integration
def test_plan_predicts_time_and_cost_and_the_run_records_it(tiny_dataset, tmp_path):
    """`kubetune plan --dataset --gpus --json`: per GPU type the step time, throughput, the
    steps a real run of the same recipe takes, wall time, GPU-hours and cost, the fastest and
    the cheapest marked; the run's metrics.json then holds the prediction beside what it
    measured, and the KFP Markdown says both."""
    sets = [
        "--set",
        "hardware.price_per_gpu_hour={A100-80GB: 2.0, H100: 5.0}",
        "--set",
        "train.max_steps=null",
        "--set",
        "train.epochs=1",
        "--set",
        "distributed.procs_per_node=1",
    ]
    result = run_cli(
        "plan",
        TINY_DEMO,
        "--dataset",
        tiny_dataset,
        "--gpus",
        "A100-80GB,H100-80GB,2xL4",  # a type without its memory, as the issue writes it
        "--json",
        *sets,
    )
    assert result.code == 0, result
    options = json.loads(result.out)["speed"]["options"]
    assert [(o["gpu"], o["gpus"]) for o in options] == [
        ("A100-80GB", 1),
        ("H100-80GB", 1),
        ("L4-24GB", 2),
    ]
    stats = json.loads((tiny_dataset / "stats.json").read_text())
    for o in options:
        assert o["wall_seconds"] == pytest.approx(sum(o["wall_parts_seconds"].values()))
        assert o["gpu_hours"] == pytest.approx(o["wall_seconds"] / 3600 * o["gpus"])
        micro = o["memory"]["micro_batch"]
        rows = stats["splits"]["train"] // o["gpus"] // micro * micro * o["gpus"]
        assert o["steps"] * o["step"]["rows_per_step"] == rows  # one epoch, as the worker does
    a100, h100, l4 = options
    # each figure with the band the out-of-sample errors imply; 2 x L4 is outside the calibration
    band = json.loads(CALIBRATION.read_text())["band"]
    low, high = band["low"], band["high"]
    rate, wall = a100["samples_per_second"], a100["wall_seconds"]
    assert a100["band"]["samples_per_second"] == pytest.approx([rate * low, rate * high])
    assert a100["band"]["wall_seconds"] == pytest.approx([wall / high, wall / low])
    # kubetune's fused LoRA has no GPU point yet (the H200 runs predate it)
    assert a100["outside_calibration"] == {"LoRA kernel": "fused"}
    assert l4["outside_calibration"] == {
        "GPU": "L4-24GB",
        "LoRA kernel": "fused",
        "nodes": "several nodes",  # procs_per_node=1: two nodes, and no point ran on two
    }
    per_row = stats["tokens"]["train"] / stats["splits"]["train"]
    assert a100["real_tokens_per_second"] == pytest.approx(per_row * a100["samples_per_second"])
    assert a100["cost"] == pytest.approx(a100["gpu_hours"] * 2.0)
    assert h100["cost"] == pytest.approx(h100["gpu_hours"] * 5.0) and l4["cost"] is None
    timed = [o for o in options if o["fits"]]
    fastest = min(timed, key=lambda o: o["wall_seconds"])
    cheapest = min((o for o in timed if o["cost"] is not None), key=lambda o: o["cost"])
    assert "fastest" in fastest["marks"] and "cheapest" in cheapest["marks"]
    assert sum(len(o["marks"]) for o in options) == 2
    text = run_cli("plan", TINY_DEMO, "--dataset", tiny_dataset, "--gpus", "A100-80GB,B200", *sets)
    assert text.code == 0 and "| 1 x A100-80GB | yes" in text.out, text.out
    assert f"{rate:,.2f} ({rate * low:,.2f}-{rate * high:,.2f})" in text.out, text.out
    assert "outside the calibration: 1 x B200-180GB: no measured point ran GPU B200" in text.out
    # the same recipe trained: the steps the plan counted, and the prediction recorded
    out = tmp_path / "adapter"
    trained = run_cli(
        "train",
        TINY_DEMO,
        "--dataset",
        tiny_dataset,
        "--output",
        out,
        *sets,
        "--set",
        "hardware.gpu=A100-80GB",
    )
    assert trained.code == 0, trained
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == a100["steps"]
    assert "on 1 x A100-80GB: " in trained.out and f"for {metrics['steps']} steps" in trained.out
    prediction = metrics["prediction"]
    assert prediction["gpu"] == "A100-80GB" and prediction["measured_on"] == "cpu"
    # the plan's setup, with the kernels this CPU run chose (no compiled layers off CUDA)
    assert prediction["setup"] == {**a100["setup"], "compiled": False}
    from kubetune.components.planner.architecture import Architecture
    from kubetune.components.planner.gpus import GPU_TYPES

    recorded = step_time(
        Architecture(**prediction["architecture"]),
        Setup(**prediction["setup"]),
        GPU_TYPES["A100-80GB"],
        Efficiency.load(),
    )
    assert prediction["step_seconds"] == pytest.approx(recorded.step_seconds)
    assert prediction["train_seconds"] == pytest.approx(metrics["steps"] * recorded.step_seconds)
    assert prediction["measured"]["tokens_per_second"] == metrics["padded_tokens_per_second"]
    assert prediction["measured"]["train_seconds"] == metrics["train_seconds"]
    assert prediction["error"]["tokens_per_second"] == pytest.approx(
        prediction["tokens_per_second"] / metrics["padded_tokens_per_second"] - 1
    )
    from kubetune.components.planner.forecast import prediction_markdown

    markdown = prediction_markdown(prediction)
    assert f"| tokens/s (job) | {prediction['tokens_per_second']:,.1f} |" in markdown
    assert f"{metrics['train_seconds']:,.1f}" in markdown
    # a CPU run is no calibration point, and the points file is left as it was
    points = tmp_path / "points.json"
    points.write_bytes(POINTS.read_bytes())
    refit = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "fit_speed_model.py"),
            "--add-run",
            str(out / "metrics.json"),
            "--points",
            str(points),
        ],
        capture_output=True,
        text=True,
    )
    assert refit.returncode == 2 and "not a GPU run" in refit.stderr
    assert points.read_bytes() == POINTS.read_bytes()
    # a benchmark's committed raw output: its GPU case lines are points, a CPU one is not
    from kubetune.components.planner.calibration import load_point, raw_points

    raw = tmp_path / "raw"
    raw.mkdir()
    line = {"case": "tiny", "trainer": {"steady_tokens_per_second": 1000.0}, "kubetune": metrics}
    (raw / "cpu.txt").write_text(json.dumps({"machine": {}}) + "\n" + json.dumps(line) + "\n")
    assert raw_points(raw) == []
    on_gpu = {**line, "kubetune": {**metrics, "device": "cuda"}}  # as a GPU run's line reads
    (raw / "gpu.txt").write_text(json.dumps(on_gpu) + "\n")
    ours, trainer = (load_point(p) for p in raw_points(raw))
    assert ours.setup == Setup(**prediction["setup"]) and ours.gpu == "A100-80GB"
    assert ours.measured == (
        metrics["steady_tokens_per_second"] or metrics["padded_tokens_per_second"]
    )
    assert trainer.measured == 1000.0 and trainer.arch == ours.arch
    assert (trainer.setup.lora, trainer.setup.compiled, trainer.setup.loss) == (
        "peft",
        False,
        "transformers",
    )
    assert trainer.setup.checkpointed == ours.arch.layers
    # DataCollatorWithFlattening's one row per micro batch, attended with SDPA's dense mask
    assert trainer.setup.dense_attention and trainer.setup.span == ours.setup.tokens


def test_plan_refuses_what_it_cannot_price(tmp_path):
    from kubetune.components.errors import UserError
    from kubetune.components.planner.forecast import options

    bad_gpu = run_cli("plan", TINY_DEMO, "--gpus", "A100-80GB,B300")
    assert_user_error(bad_gpu, "--gpus: unknown GPU type 'B300'? known: A100-80GB, A100-40GB")
    bad_price = run_cli("plan", TINY_DEMO, "--set", "hardware.price_per_gpu_hour={B300: 9}")
    assert_user_error(bad_price, "hardware.price_per_gpu_hour", "unknown GPU type 'B300'")
    with pytest.raises(UserError, match="hardware.price_per_gpu_hour.*more than 0"):
        load_recipe(TINY_DEMO, ["hardware.price_per_gpu_hour=-1"])
    cfg = load_recipe(TINY_DEMO)  # 2 GPUs a node
    with pytest.raises(UserError, match="which GPU type '2xA100'[?] it may be A100-80GB or A1"):
        options(cfg, "2xA100")
    with pytest.raises(UserError, match="--gpus 3xA100-80GB: not whole nodes of"):
        options(cfg, "3xA100-80GB")
    with pytest.raises(UserError, match=f"--dataset {tmp_path / 'none'}: no prepared dataset"):
        options(cfg, None, tmp_path / "none")


@pytest.mark.parametrize(
    "device,name",
    [
        ("NVIDIA GeForce RTX 4090", "RTX4090-24GB"),
        ("NVIDIA RTX A6000", "RTXA6000-48GB"),
        ("NVIDIA B200", "B200-180GB"),
        ("AMD Instinct MI300X", "MI300X-192GB"),
        ("NVIDIA A10", "A10-24GB"),
    ],
)
def test_the_gpus_people_rent_are_in_the_one_table(device, name):
    """A run's device name finds its type (the speed prediction and MFU), and `plan --gpus`
    takes the short name."""
    from kubetune.components.planner.gpus import gpu_type_of, named

    assert gpu_type_of(device).name == name
    assert [g.name for g in named(name.rsplit("-", 1)[0])] == [name]
