"""`kubetune plan` against published memory points and against real tensors measured here."""

from __future__ import annotations

import json

import pytest
import torch

from kubetune.components.config import load_recipe
from kubetune.components.errors import UserError
from kubetune.components.methods.lora import add_lora
from kubetune.components.planner.plan import GB, estimate
from kubetune.components.train.modeling import load_base

from .conftest import RECIPES, TINY_DEMO

# Published points and the setups they were measured with (as far as the sources say;
# the rest is our assumption, stated here).
PUBLISHED = [
    # lit-parrot: Falcon-7B LoRA (r=8 on the fused qkv), ~16 GB on one GPU; assumed micro batch 1,
    # ~512-token Alpaca rows, no activation checkpointing.
    (
        "lit-parrot falcon-7b lora",
        "falcon-7b-qlora",
        [
            "method=lora",
            "distributed.strategy=ddp",
            "lora.r=8",
            "lora.target_modules=[query_key_value]",
            "train.micro_batch_size=1",
            "data.max_seq_len=512",
            "train.gradient_checkpointing=false",
        ],
        "total",
        16.0,
    ),
    # lit-parrot: Falcon-7B full fine-tuning, ~40 GB per GPU on 6 GPUs with FSDP; bf16-mixed
    # (fp32 weights, gradients and AdamW moments), micro batch 4, ~1079-token rows, no checkpointing.
    (
        "lit-parrot falcon-7b full",
        "falcon-7b-qlora",
        [
            "method=full",
            "distributed.strategy=fsdp",
            "distributed.procs_per_node=6",
            "model.dtype=float32",
            "train.micro_batch_size=4",
            "data.max_seq_len=1079",
            "train.gradient_checkpointing=false",
        ],
        "total",
        40.0,
    ),
    # Lambda: Falcon-40B 4-bit, ~27 GB to load on one A100-80GB.
    (
        "lambda falcon-40b 4-bit load",
        "falcon-40b-qlora",
        ["distributed.procs_per_node=1", "distributed.nodes=1"],
        "load",
        27.0,
    ),
    # Lambda: Falcon-40B QLoRA fine-tuning, ~62 GB on one A100-80GB; seq 2048, micro batch 1,
    # no activation checkpointing assumed.
    (
        "lambda falcon-40b qlora",
        "falcon-40b-qlora",
        [
            "distributed.procs_per_node=1",
            "distributed.nodes=1",
            "train.gradient_checkpointing=false",
        ],
        "total",
        62.0,
    ),
]


@pytest.mark.parametrize(
    "name, recipe, sets, part, published", PUBLISHED, ids=[p[0] for p in PUBLISHED]
)
def test_plan_is_near_the_published_points(name, recipe, sets, part, published):
    cfg = load_recipe(RECIPES / f"{recipe}.yaml", sets)
    plan = estimate(cfg)
    predicted = (
        plan.total if part == "total" else plan.parts["weights"] + plan.parts["cuda overhead"]
    )
    assert abs(predicted / GB - published) / published < 0.2, (name, predicted / GB, published)


@pytest.mark.parametrize("arch", ["falcon", "qwen3-moe"])
def test_plan_counts_match_the_real_tiny_model_and_optimizer(arch):
    """Weights and trainable state as the planner counts them equal the bytes of a real tiny
    LoRA model and its AdamW state after one step (fp32 on CPU); on a MoE model the LoRA pairs
    of every routed expert (peft's parameter LoRA) are counted too."""

    sets = ["train.gradient_checkpointing=false", f"model.name_or_path=tiny://{arch}"]
    cfg = load_recipe(TINY_DEMO, sets)
    plan = estimate(cfg, gpus=1, dtype_bytes=4)
    model, _ = load_base(cfg, torch.device("cpu"))
    model = add_lora(cfg, model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable)
    x = torch.tensor([[3, 4, 5, 6]])
    model(input_ids=x, labels=x).loss.backward()
    optimizer.step()
    frozen = {id(p): p for p in model.parameters() if not p.requires_grad}
    assert sum(p.nbytes for p in frozen.values()) == plan.parts["weights"]
    state_bytes = sum(
        v.nbytes for s in optimizer.state.values() for k, v in s.items() if k != "step"
    )
    measured = sum(p.nbytes + p.grad.nbytes for p in trainable) + state_bytes
    assert measured == plan.parts["trainable state"]
    assert plan.arch.adapter_params == sum(p.numel() for p in trainable)


@pytest.mark.integration
def test_plan_cli_says_whether_it_fits(cli):
    result = cli(
        "plan",
        RECIPES / "falcon-40b-qlora.yaml",
        "--set",
        "train.micro_batch_size=16",
        "--set",
        "train.gradient_checkpointing=false",
    )
    assert result.code == 0 and "does NOT fit on A100-80GB" in result.out, result
    result = cli("plan", RECIPES / "falcon-7b-qlora.yaml", "--json")
    plan = json.loads(result.out)
    assert plan["fits"] is True and plan["total_params"] == 6_921_720_704
    for method in ("full", "lora"):  # every method's trainable count, against the real model
        result = cli("plan", TINY_DEMO, "--json", "--set", f"method={method}")
        assert result.code == 0, result
        cfg = load_recipe(TINY_DEMO, [f"method={method}"])
        model, _ = load_base(cfg, torch.device("cpu"))
        model = add_lora(cfg, model) if method == "lora" else model
        real = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert json.loads(result.out)["trainable_params"] == real, method
    result = cli("plan", RECIPES / "falcon-7b-qlora.yaml", "--set", "hardware.gpu=TPU-v9")
    assert result.code == 2 and "unknown GPU 'TPU-v9'" in result.err


def test_plan_accounts_for_fsdp_sharding_and_offload():
    """Each FSDP strategy's memory equals the plan of the setup it behaves like."""
    recipe = RECIPES / "llama3-70b-full-fsdp.yaml"

    def parts(*sets, gpus=None):
        return estimate(load_recipe(recipe, list(sets)), gpus=gpus).parts

    full = parts()
    nodes = load_recipe(recipe).distributed.nodes
    assert nodes > 1  # 2 nodes x 8: hybrid shards over one node's 8 and replicates across
    per_node = load_recipe(recipe).distributed.procs_per_node
    assert parts("distributed.fsdp.sharding=hybrid") == parts(gpus=per_node)
    # no_shard: a whole replica with its whole state, as a single GPU holds it
    replica = parts("distributed.fsdp.sharding=no_shard")
    alone = parts(gpus=1)
    assert replica["weights"] == alone["weights"] > 0
    assert replica["trainable state"] == alone["trainable state"] > 0
    assert replica["gathered layers"] == 0
    # shard_grad_op: weights stay gathered from forward to backward; state is sharded
    zero2 = parts("distributed.fsdp.sharding=shard_grad_op")
    assert zero2["weights"] == alone["weights"]
    assert zero2["trainable state"] == full["trainable state"] < alone["trainable state"]
    # cpu_offload: nothing at rest on the GPU but the layer being gathered
    offload = parts("distributed.fsdp.cpu_offload=true")
    assert offload["weights"] == offload["trainable state"] == 0
    assert offload["gathered layers"] == full["gathered layers"] > 0
    assert sum(offload.values()) < sum(full.values())
    refused = [
        ("distributed.strategy=ddp", "distributed.fsdp.sharding=hybrid"),
        ("distributed.fsdp.cpu_offload=true", "method=qlora"),
        ("train.freeze_layers=2", "method=lora"),
    ]
    for sets in refused:
        with pytest.raises(UserError):
            load_recipe(recipe, list(sets))


def test_plan_counts_match_a_real_model_with_frozen_layers():
    """method=full with train.freeze_layers=1: the planner's trainable state is the bytes of the
    real tiny model's trained parameters, their gradients and AdamW state after one step."""
    from kubetune.components.methods.full import freeze_bottom

    cfg = load_recipe(
        TINY_DEMO, ["method=full", "train.freeze_layers=1", "train.gradient_checkpointing=false"]
    )
    plan = estimate(cfg, gpus=1, dtype_bytes=4)
    model, _ = load_base(cfg, torch.device("cpu"))
    freeze_bottom(model, 1)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable)
    x = torch.tensor([[3, 4, 5, 6]])
    model(input_ids=x, labels=x).loss.backward()
    optimizer.step()
    state = sum(v.nbytes for s in optimizer.state.values() for k, v in s.items() if k != "step")
    assert sum(p.grad.nbytes for p in trainable) + state == plan.parts["trainable state"]
    frozen = {id(p): p.numel() for p in model.parameters() if not p.requires_grad}
    assert plan.arch.frozen_params == sum(frozen.values()) > 0
    with pytest.raises(UserError, match="train.freeze_layers=2: the model has 2 decoder layers"):
        freeze_bottom(model, 2)


def test_architecture_counts_are_cached_per_model_and_adapter_settings(tmp_path, monkeypatch):
    from dataclasses import asdict

    from kubetune.components.planner import architecture as plan

    monkeypatch.setenv("KUBETUNE_CACHE", str(tmp_path))
    cfg = load_recipe(RECIPES / "falcon-7b-qlora.yaml")
    counted = plan.architecture(cfg)
    (cached,) = (tmp_path / "architectures").glob("*.json")
    assert json.loads(cached.read_text()) == asdict(counted)
    # the next call reads the file (a marked copy proves it) instead of counting again
    cached.write_text(json.dumps({**asdict(counted), "total_params": 1}))
    assert plan.architecture(cfg).total_params == 1
    # other adapter settings are another entry, counted afresh
    other = plan.architecture(load_recipe(RECIPES / "falcon-7b-qlora.yaml", ["lora.r=8"]))
    assert other.adapter_params * 8 == counted.adapter_params  # r=64 in the recipe
    assert len(list((tmp_path / "architectures").glob("*.json"))) == 2
    # an unreadable entry is counted again and replaced
    cached.write_text("{")
    assert plan.architecture(cfg) == counted
    assert json.loads(cached.read_text()) == asdict(counted)


# Published sizes (billions; the model cards'): total, active, and which active convention
PUBLISHED_SIZES = [
    ("Qwen/Qwen3-30B-A3B", 30.5, 3.3, "active"),  # Qwen3 report: 30.5B total, 3.3B activated
    ("mistralai/Mixtral-8x7B-v0.1", 46.7, 12.9, "active"),  # Mistral: 46.7B, 12.9B per token
    ("openai/gpt-oss-20b", 20.9, 3.6, "active_without_embeddings"),  # OpenAI's model card
    ("Qwen/Qwen3-8B", 8.2, 8.2, "active"),
    ("meta-llama/Llama-3.1-8B", 8.0, 8.0, "active"),
    ("google/gemma-3-1b-pt", 1.0, 1.0, "active"),  # 302M embedding + 698M non-embedding
]


def test_the_qwen3_moe_qlora_recipe_plans_within_24_gib_with_every_expert_adapted():
    """pipelines/recipes/qwen3-30b-a3b-qlora.yaml: one 24 GiB GPU, experts 4-bit, LoRA (r=8) on
    attention and on all 128 experts of its 48 layers, counted from the published shapes."""
    from kubetune.components.planner.architecture import architecture

    cfg = load_recipe(RECIPES / "qwen3-30b-a3b-qlora.yaml")
    attention = (2048 + 4096) * 2 + (2048 + 512) * 2  # q, o; k, v (32 and 4 heads of 128)
    experts = 128 * ((2048 + 2 * 768) + (768 + 2048))  # gate_up_proj, down_proj per expert
    assert architecture(cfg).adapter_params == 8 * 48 * (attention + experts)
    plan = estimate(cfg, gpus=1)
    assert plan.total <= 24 * 2**30, plan.total / 2**30


@pytest.mark.parametrize(("hub_id", "total", "active", "convention"), PUBLISHED_SIZES)
def test_plan_counts_todays_models_as_published(hub_id, total, active, convention):
    """Counted on the meta device from the real config (no download): total and active
    parameters as the model card states them, each figure saying its convention."""
    from kubetune.components.planner.architecture import architecture

    cfg = load_recipe(TINY_DEMO, [f"model.name_or_path={hub_id}", "method=lora"])
    params = architecture(cfg).params_record()
    # the cards give one decimal, rounded or cut (Qwen3-30B-A3B's 3.35B active reads "3.3B")
    assert params["total"] / 1e9 == pytest.approx(total, abs=0.06)
    assert params[convention] / 1e9 == pytest.approx(active, abs=0.06)
    assert "top-k / experts" in params["convention"]
    plan = json.loads(run_plan(hub_id).out)  # the same figures reach `kubetune plan --json`
    assert params.items() <= find_params(plan).items()


def run_plan(hub_id: str):
    from .conftest import run_cli

    result = run_cli("plan", TINY_DEMO, "--set", f"model.name_or_path={hub_id}", "--json")
    assert result.code == 0, result
    return result


def find_params(node):
    """The `params` record anywhere in plan --json's output."""
    if isinstance(node, dict):
        if "params" in node:
            return node["params"]
        node = list(node.values())
    for child in node if isinstance(node, list) else []:
        found = find_params(child)
        if found:
            return found
    return {}


def test_lora_on_a_bf16_moe_models_experts_plans_their_materialized_weights():
    """peft's parameter LoRA makes each MoE layer's W + B A at every forward and keeps it for the
    backward: gpt-oss-20b's recipe plans one more copy of every kept layer's experts (bf16) than
    the same run with LoRA on attention only; a 4-bit base's pairs (Experts4bit) make none."""
    from kubetune.components.planner.architecture import architecture

    off = ["train.gradient_checkpointing=false"]
    recipe = RECIPES / "gpt-oss-20b-lora.yaml"
    experts = estimate(load_recipe(recipe, off), gpus=1).parts["activations"]
    attention = ["lora.target_modules=[q_proj,k_proj,v_proj,o_proj]"]
    plain = estimate(load_recipe(recipe, off + attention), gpus=1).parts["activations"]
    per_layer = 32 * (2880 * 2 * 2880 + 2880 * 2880)  # gate_up and down of 32 experts
    assert experts - plain == 24 * per_layer * 2
    qlora = load_recipe(RECIPES / "qwen3-30b-a3b-qlora.yaml")
    assert not architecture(qlora).materialized_experts


@pytest.mark.integration  # counts Llama-3-8B's architecture (seconds)
def test_plan_knows_the_preference_objective():
    """A dpo row holds a pair (twice max_seq_len): its memory is sft's on rows twice as long,
    a frozen reference copy adds the policy's weights once more, and a step adds the
    reference's forward (flops without gradients); precomputed log-probabilities cost one
    forward pass over the data instead."""
    from dataclasses import replace

    from kubetune.components.planner.architecture import architecture
    from kubetune.components.planner.data_figures import data_figures
    from kubetune.components.planner.fit import as_set
    from kubetune.components.planner.forecast import planned_setup, wall_parts
    from kubetune.components.planner.gpus import GPU_TYPES
    from kubetune.components.planner.speed import Efficiency, step_time, work

    recipe = RECIPES / "llama3-8b-lora-fsdp.yaml"
    pairs = ["train.objective=dpo", "data.format=preference"]
    sft = load_recipe(recipe)
    doubled = load_recipe(recipe, [f"data.max_seq_len={2 * sft.data.max_seq_len}"])
    dpo = load_recipe(recipe, pairs)
    assert estimate(dpo).parts == estimate(doubled).parts
    assert estimate(dpo).seq_len == 2 * sft.data.max_seq_len
    full_live = estimate(load_recipe(recipe, [*pairs, "method=full", "train.reference=live"]))
    assert full_live.parts["reference copy"] == full_live.parts["weights"] > 0
    assert "reference copy" not in estimate(load_recipe(recipe, [*pairs, "method=full"])).parts

    eff, gpu = Efficiency.load(), GPU_TYPES["H100-80GB"]

    def step(cfg):
        arch = architecture(cfg)
        fit = as_set(cfg, arch.layers, "as run")
        data = data_figures(cfg, None)
        setup = planned_setup(cfg, arch, fit, data, cfg.distributed.world_size)
        return arch, setup, data, step_time(arch, setup, gpu, eff)

    arch, setup, data, live = step(dpo)
    assert setup.reference_forward and setup.row_len == 2 * sft.data.max_seq_len
    flops = work(arch, setup).flops
    no_ref = work(arch, replace(setup, reference_forward=False)).flops
    assert flops["reference forward"] == pytest.approx(
        no_ref["forward"]
        * (arch.linear_params + arch.hidden * arch.vocab)
        / (arch.linear_params + arch.hidden * arch.vocab + arch.adapter_params)
    )
    assert live.step_seconds > step_time(arch, replace(setup, reference_forward=False), gpu,
                                         eff).step_seconds  # fmt: skip
    simpo = load_recipe(recipe, ["train.objective=simpo", "data.format=preference"])
    assert not step(simpo)[1].reference_forward
    pre = load_recipe(recipe, [*pairs, "train.reference=precomputed"])
    arch, setup, data, timed = step(pre)
    assert not setup.reference_forward
    parts = wall_parts(pre, arch, setup, timed, 100, data)
    assert parts["reference pass"] > 0 and "reference pass" not in wall_parts(
        dpo, *step(dpo)[:2], live, 100, data
    )
