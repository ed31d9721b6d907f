"""`kubetune train` through the real CLI: 2 torchrun workers on gloo, tiny models, checked with
peft and plain transformers (eval loss recomputed outside kubetune)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from datasets import load_from_disk
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from kubetune.components.methods.llama_adapter import load_into
from kubetune.components.models import resolve_model

from .conftest import KUBETUNE, TINY_DEMO, assert_user_error, run_prepare

pytestmark = pytest.mark.integration

METRIC_KEYS = {
    "steps",
    "resumed_from_step",
    "loss",
    "eval_loss",
    "tokens_per_second",
    "steady_tokens_per_second",
    "samples_per_second",
    "peak_memory_bytes",
    "trainable_params",
    "total_params",
    "quantized_linear_modules",
    "mfu",
}


@pytest.fixture(scope="module")
def dataset(tiny_dataset) -> Path:
    return tiny_dataset


@pytest.fixture(scope="module")
def base_loss(dataset) -> float:
    """Eval loss of the untrained tiny Falcon, computed with plain transformers."""
    return eval_loss(base_model(), dataset)


def train(cli, dataset, output, *sets):
    args = [a for s in sets for a in ("--set", s)]
    return cli("train", TINY_DEMO, "--dataset", dataset, "--output", output, *args)


@torch.no_grad()
def eval_loss(model, dataset: Path) -> float:
    """Token-weighted loss over the eval split, one unpadded row at a time."""
    model.eval()
    total = tokens = 0.0
    for row in load_from_disk(str(dataset))["eval"]:
        ids = torch.tensor([row["input_ids"]])
        labels = torch.tensor([row["labels"]])
        n = int((labels[:, 1:] != -100).sum())
        total += float(model(input_ids=ids, labels=labels).loss) * n
        tokens += n
    return total / tokens


def base_model(arch="falcon"):
    return AutoModelForCausalLM.from_pretrained(
        resolve_model(f"tiny://{arch}"), dtype=torch.float32
    )


def metrics_of(output: Path) -> dict:
    metrics = json.loads((output / "metrics.json").read_text())
    assert set(metrics) >= METRIC_KEYS
    return metrics


def loss_fell(metrics: dict) -> bool:
    losses = [loss for _, loss in metrics["loss"]]
    return sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.05


def test_qlora_ddp_trains_and_the_adapter_loads_with_peft(cli, dataset, base_loss, tmp_path):
    from peft import PeftModel

    out = tmp_path / "qlora"
    result = train(
        cli,
        dataset,
        out,
        "method=qlora",
        "distributed.strategy=ddp",
        "distributed.procs_per_node=2",
        "train.max_steps=30",
    )
    assert result.code == 0, result
    metrics = metrics_of(out)
    assert metrics["steps"] == 30 and metrics["world_size"] == 2 and loss_fell(metrics)
    assert metrics["quantized_linear_modules"] == 8  # 2 layers x 4 linear layers of Falcon
    # on the CPU: no Liger, the chunked loss over the output head, the dense-mask fallback
    assert metrics["kernels"]["loss"] == "chunked_linear_ce"
    assert metrics["attn_implementation"] == "sdpa"
    assert metrics["mfu"] is None  # no GPU here
    # steady speed: the tokens after the first 5 steps over their time, so some of the run
    assert metrics["steady_tokens_per_second"] > 0
    assert (out / "adapter_model.safetensors").is_file() and list((out / "tensorboard").iterdir())
    tuned = PeftModel.from_pretrained(base_model(), out)
    # the adapter trained on the 4-bit base still helps the full-precision base
    assert eval_loss(tuned, dataset) < base_loss - 0.05


def test_lora_fsdp_matches_peft_recomputation(cli, dataset, base_loss, tmp_path):
    from peft import PeftModel

    out = tmp_path / "fsdp"
    result = train(
        cli,
        dataset,
        out,
        "distributed.strategy=fsdp",
        "distributed.fsdp.sharding=no_shard",  # a replica per process through FSDP2's 2-D mesh
        "distributed.fsdp.cpu_offload=true",
        "train.max_steps=30",
        "train.flop_counter.start_step=3",
    )
    assert result.code == 0, result
    metrics = metrics_of(out)
    assert loss_fell(metrics)
    # step 3's FLOPs counted by torch.utils.flop_counter (forward, recomputation, backward of
    # every matmul and attention) land near the analytic 4N + 2N' + attention per token
    assert metrics["fsdp"] == {
        "sharding": "no_shard",
        "cpu_offload": True,
        "mesh": [2, 1],  # 2 replicas, shard groups of 1
        "placements": ["Replicate()", "Shard(dim=0)"],
    }
    counted = metrics["flop_counter"]
    assert counted["counted_step"] == 3 and counted["timed_step"] == 4
    assert counted["tokens"] > 0 and counted["flops"] == pytest.approx(
        counted["flops_per_token"] * counted["tokens"]
    )
    assert 0.8 < counted["flops_per_token"] / counted["analytic_flops_per_token"] < 2.0
    assert counted["tflops_per_second"] > 0 and counted["mfu"] is None  # no GPU here
    tuned = PeftModel.from_pretrained(base_model(), out)
    recomputed = eval_loss(tuned, dataset)
    assert recomputed == pytest.approx(metrics["eval_loss"], rel=1e-4)
    assert recomputed < base_loss - 0.05
    assert metrics["trainable_params"] == sum(
        p.numel() for n, p in tuned.named_parameters() if "lora_" in n
    )
    # the trained adapter merges, and the merged model is the adapter's model
    assert json.loads((out / "base_model.json").read_text())["name_or_path"] == "tiny://falcon"
    merged_dir = tmp_path / "merged"
    assert cli("merge", TINY_DEMO, "--adapter", out, "--output", merged_dir).code == 0
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    assert eval_loss(merged, dataset) == pytest.approx(recomputed, rel=1e-5)
    wrong = cli(
        "merge",
        TINY_DEMO,
        "--adapter",
        out,
        "--output",
        tmp_path / "m2",
        "--set",
        "model.name_or_path=tiny://llama",
    )
    assert_user_error(wrong, "trained on tiny://falcon")


def test_lora_deepspeed_zero3_with_optimizer_offload(cli, dataset, tmp_path):
    from peft import PeftModel

    out = tmp_path / "zero3"
    result = train(
        cli,
        dataset,
        out,
        "distributed.strategy=deepspeed",
        "distributed.zero_stage=3",
        "distributed.offload=optimizer",
        "train.max_steps=30",
        "train.profile.wait=1",
        "train.profile.warmup=1",
        "train.profile.active=2",
    )
    assert result.code == 0, result
    metrics = metrics_of(out)
    # what DeepSpeed's engine and ZeRO optimizer ran, not what the recipe asked for
    assert metrics["deepspeed"] == {
        "zero_stage": 3,
        "optimizer": "DeepSpeedZeroOptimizer_Stage3",
        "offload_optimizer": True,
        "offload_param": False,
    }
    assert loss_fell(metrics)
    tuned = PeftModel.from_pretrained(base_model(), out)
    assert eval_loss(tuned, dataset) == pytest.approx(metrics["eval_loss"], rel=1e-4)
    # one PyTorch profiler trace per process, holding the 2 active steps (steps 3 and 4)
    traces = sorted((out / "tensorboard" / "profile").glob("*.pt.trace.json"))
    assert [t.name.split(".")[0] for t in traces] == ["rank0", "rank1"]
    for trace in traces:
        events = json.loads(trace.read_text())["traceEvents"]
        steps = {e["name"] for e in events if e.get("name", "").startswith("ProfilerStep#")}
        assert steps == {"ProfilerStep#2", "ProfilerStep#3"}


def test_full_fsdp_writes_a_model_from_pretrained_loads(cli, dataset, base_loss, tmp_path):
    out = tmp_path / "full"
    result = train(
        cli,
        dataset,
        out,
        "method=full",
        "distributed.strategy=fsdp",
        "distributed.fsdp.sharding=hybrid",  # shard in a node, replicate across (1 node here)
        "train.max_steps=20",
        "train.lr=1e-3",
    )
    assert result.code == 0, result
    metrics = metrics_of(out)
    assert loss_fell(metrics) and metrics["trainable_params"] == metrics["total_params"]
    assert metrics["fsdp"]["mesh"] == [1, 2]  # 1 node: one replica, sharded over its 2 processes
    tuned = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert list(out.glob("*.safetensors")) and not list(out.glob("*.bin"))
    recomputed = eval_loss(tuned, dataset)
    assert recomputed == pytest.approx(metrics["eval_loss"], rel=1e-4)
    assert recomputed < base_loss - 0.3


def test_resume_continues_exactly(cli, dataset, tmp_path):
    """Interrupted at a checkpoint and resumed, a run has the very losses of an uninterrupted one."""
    out = tmp_path / "run"
    sets = ("train.max_steps=20", "train.save_steps=5", "lora.dropout=0.1")
    assert train(cli, dataset, out, *sets).code == 0
    straight = metrics_of(out)
    # Back to the state right after step 10: later checkpoints, outputs and metrics gone, and a
    # half-written checkpoint of step 15 left behind as a crash would leave it.
    checkpoints = out / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-0000010", "step-0000015"]
    (checkpoints / "step-0000015").rename(checkpoints / ".step-0000015.partial")
    (checkpoints / ".step-0000015.partial" / "trainer_state.json").unlink()
    for name in ("metrics.json", "adapter_model.safetensors"):
        (out / name).unlink()
    result = train(cli, dataset, out, *sets)
    assert result.code == 0, result
    assert "resuming from" in result.out and "step-0000010" in result.out
    resumed = metrics_of(out)
    assert resumed["resumed_from_step"] == 10 and resumed["steps"] == 20
    assert [s for s, _ in resumed["loss"]] == list(range(1, 21))
    for (step, a), (_, b) in zip(straight["loss"], resumed["loss"], strict=True):
        assert a == pytest.approx(b, abs=1e-5), step
    assert resumed["eval_loss"] == pytest.approx(straight["eval_loss"], abs=1e-5)


def test_llama_adapter_on_fsdp_resumes_exactly_and_is_served_unmerged(cli, dataset, tmp_path):
    """method=adapter under FSDP2: resumed after step 10, the prompts and gates are those of an
    uninterrupted run; merge says the prompts are served unmerged, and evaluate serves the merged
    folder with them: the eval loss the training run reported."""
    out = tmp_path / "run"
    sets = ("method=adapter", "distributed.strategy=fsdp", "train.max_steps=20")
    sets += ("train.save_steps=10", "train.lr=0.05")
    assert train(cli, dataset, out, *sets).code == 0
    straight, metrics = load_file(str(out / "adapter.safetensors")), metrics_of(out)
    gates = [k for k in straight if k.endswith("adapter.gate")]
    assert gates and all(straight[k].abs().max() > 0 for k in gates)  # off their zero start
    checkpoints = out / "checkpoints"
    assert "step-0000010" in {p.name for p in checkpoints.iterdir()}
    for later in checkpoints.glob("step-*"):
        if later.name != "step-0000010":
            shutil.rmtree(later)
    for name in ("metrics.json", "adapter.safetensors"):
        (out / name).unlink()
    result = train(cli, dataset, out, *sets)
    assert result.code == 0 and "step-0000010" in result.out, result
    resumed = load_file(str(out / "adapter.safetensors"))
    assert set(resumed) == set(straight)
    for key, tensor in straight.items():
        torch.testing.assert_close(resumed[key], tensor, atol=1e-6, rtol=1e-5)

    tuned = base_model()
    load_into(tuned, out)
    assert eval_loss(tuned, dataset) == pytest.approx(metrics["eval_loss"], rel=1e-4)
    merged = tmp_path / "merged"
    result = cli(
        "merge", TINY_DEMO, "--adapter", out, "--output", merged, "--set", "method=adapter"
    )
    assert result.code == 0 and "served unmerged" in result.out, result
    evaluation = tmp_path / "eval"
    result = cli(
        "evaluate",
        TINY_DEMO,
        "--model",
        merged,
        "--dataset",
        dataset,
        "--output",
        evaluation,
        "--set",
        "eval.num_prompts=2",
        "--set",
        "eval.min_rouge_l=null",
    )
    assert result.code == 0, result
    served = json.loads((evaluation / "metrics.json").read_text())["tuned"]
    assert served["eval_loss"] == pytest.approx(metrics["eval_loss"], rel=1e-4)


def rank_processes(root: int) -> dict[str, int]:
    """The training ranks under process `root` (the worker names itself kubetune-rankN), by
    name; their own children (DataLoader workers) inherit the name and are left out."""
    children: dict[int, list[int]] = {}
    names: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        names[int(entry.name)] = name
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = {}, [root]
    while todo:
        pid = todo.pop()
        for child in children.get(pid, []):
            name = names[child]
            if name.startswith("kubetune-rank") and not names.get(pid, "").startswith(
                "kubetune-rank"
            ):
                found[name] = child
            todo.append(child)
    return found


def train_cmd(dataset, out, *sets) -> list[str]:
    """The `kubetune train` command line of the tiny demo with `--set` for each of sets."""
    args = [a for s in sets for a in ("--set", s)]
    return [KUBETUNE, "train", str(TINY_DEMO), "--dataset", str(dataset), "--output", str(out),
            *args]  # fmt: skip


def test_sigkill_a_worker_then_rerun_resumes_and_finishes(dataset, tmp_path):
    out = tmp_path / "killed"
    cmd = train_cmd(dataset, out, "train.max_steps=80", "train.save_steps=5")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 240
    while not list((out / "checkpoints").glob("step-*")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert list((out / "checkpoints").glob("step-*")), "no checkpoint appeared"
    ranks = rank_processes(proc.pid)
    assert set(ranks) == {"kubetune-rank0", "kubetune-rank1"}, ranks
    os.kill(ranks["kubetune-rank1"], signal.SIGKILL)
    proc.communicate(timeout=120)
    assert proc.returncode != 0 and not (out / "metrics.json").exists()
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "resuming from" in again.stdout
    metrics = metrics_of(out)
    assert metrics["steps"] == 80 and metrics["resumed_from_step"] >= 5
    assert [s for s, _ in metrics["loss"]] == list(range(1, 81))


def test_bad_inputs(cli, dataset, tmp_path):
    assert_user_error(
        train(cli, tmp_path / "nothing", tmp_path / "o"), "not a finished `kubetune prepare` output"
    )
    assert_user_error(
        train(cli, dataset, tmp_path / "o", "method=qlora", "distributed.strategy=deepspeed"),
        "method=qlora runs with distributed.strategy=ddp",
    )
    assert_user_error(
        train(cli, dataset, tmp_path / "o", "distributed.backend=pytorchjob"),
        "distributed.backend=pytorchjob",
    )
    assert_user_error(
        train(cli, dataset, tmp_path / "o", "train.micro_batch_size=500"),
        "fewer than 2 processes x train.micro_batch_size 500",
    )
    assert_user_error(
        train(cli, dataset, tmp_path / "o", "lora.target_modules=[nonexistent]"),
        "lora.target_modules",
    )
    shutil.rmtree(tmp_path / "o", ignore_errors=True)


@pytest.mark.parametrize(
    "sets, full",
    [
        (
            (
                "method=qlora",
                "quant.bits=8",
                "quant.compute_dtype=float32",  # bf16 on a CPU doubles this test's time
                "train.gradient_checkpointing=true",
                "train.grad_accum=2",
            ),
            False,
        ),
        (
            (
                "method=adapter_v2",  # hooks and child modules under ZeRO-3's partitioning
                "distributed.strategy=deepspeed",
                "distributed.zero_stage=3",
                "distributed.offload=optimizer+params",
                "train.gradient_checkpointing=true",
                "train.grad_accum=2",
            ),
            False,
        ),
        (
            (
                "method=full",
                "distributed.strategy=deepspeed",
                "distributed.zero_stage=2",
                "train.freeze_layers=1",
            ),
            True,
        ),
    ],
    ids=[
        "qlora-8bit-checkpointing",
        "adapter-v2-zero3-offload-params-accum",
        "full-zero2-freeze-layers",
    ],
)
def test_more_combinations_train_and_load(cli, dataset, base_loss, tmp_path, sets, full):
    from peft import PeftModel

    out = tmp_path / "run"
    result = train(cli, dataset, out, "train.max_steps=20", *sets)
    assert result.code == 0, result
    metrics = metrics_of(out)
    assert loss_fell(metrics)
    if "distributed.strategy=deepspeed" in sets:  # the stage and offload that really ran
        stage = 3 if "distributed.zero_stage=3" in sets else 2
        assert metrics["deepspeed"]["zero_stage"] == stage
        assert metrics["deepspeed"]["offload_param"] == (
            "distributed.offload=optimizer+params" in sets
        )
        assert metrics["deepspeed"]["offload_optimizer"] == any(
            "offload=optimizer" in x for x in sets
        )
    else:
        assert metrics["deepspeed"] is None
    if full:
        tuned = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    elif "method=adapter_v2" in sets:
        tuned = base_model()
        load_into(tuned, out)
        saved = load_file(str(out / "adapter.safetensors"))
        assert sum(t.numel() for t in saved.values()) == metrics["trainable_params"]
    else:
        tuned = PeftModel.from_pretrained(base_model(), out)
    recomputed = eval_loss(tuned, dataset)
    assert recomputed < base_loss - 0.05
    if "method=qlora" not in sets:  # same base precision: kubetune's eval loss is reproducible
        assert recomputed == pytest.approx(metrics["eval_loss"], rel=1e-3)
    if "train.freeze_layers=1" in sets:  # the embeddings (tied head) and layer 0 never moved
        before = dict(base_model().named_parameters())
        after = dict(tuned.named_parameters())
        frozen = [n for n in before if "word_embeddings" in n or ".h.0." in n]
        assert frozen and all(torch.equal(before[n], after[n]) for n in frozen)
        assert not any(torch.equal(before[n], after[n]) for n in before if ".h.1." in n)
        assert metrics["trainable_params"] == metrics["total_params"] - sum(
            before[n].numel() for n in frozen
        )


def test_fsdp_eval_with_uneven_shares_finishes(cli, tmp_path):
    """61 eval rows on 2 ranks, one row per forward: the ranks hold 31 and 30 rows but must run
    the same number of FSDP forwards (a mismatch hangs the collectives)."""
    from peft import PeftModel

    data = tmp_path / "data"
    assert run_prepare(data, "data.eval_fraction=0.1017").code == 0
    assert json.loads((data / "stats.json").read_text())["splits"]["eval"] == 61
    out = tmp_path / "run"
    result = train(
        cli,
        data,
        out,
        "distributed.strategy=fsdp",
        "distributed.fsdp.sharding=shard_grad_op",
        "train.max_steps=3",
        "train.micro_batch_size=1",
    )
    assert result.code == 0, result
    tuned = PeftModel.from_pretrained(base_model(), out)
    assert eval_loss(tuned, data) == pytest.approx(metrics_of(out)["eval_loss"], rel=1e-4)
    assert metrics_of(out)["fsdp"] == {
        "sharding": "shard_grad_op",
        "cpu_offload": False,
        "mesh": [2],
        "placements": ["Shard(dim=0)"],
    }


def test_qlora_fsdp_shards_the_4bit_base_and_trains(cli, dataset, base_loss, tmp_path):
    """QLoRA under FSDP: 4-bit weights stored in the compute dtype, sharded per decoder layer."""
    from peft import PeftModel

    out = tmp_path / "qlora-fsdp"
    result = train(
        cli,
        dataset,
        out,
        "method=qlora",
        "distributed.strategy=fsdp",
        "quant.compute_dtype=float32",
        "train.gradient_checkpointing=true",
        "train.max_steps=30",
    )
    assert result.code == 0, result
    metrics = metrics_of(out)
    assert metrics["strategy"] == "fsdp" and metrics["quantized_linear_modules"] == 8
    assert loss_fell(metrics)
    tuned = PeftModel.from_pretrained(base_model(), out)
    assert eval_loss(tuned, dataset) < base_loss - 0.05


def test_low_memory_fsdp_load_equals_every_rank_loading(cli, dataset, tmp_path):
    """Rank 0 streaming the checkpoint into meta-built shards gives the very model (and so the
    very losses and weights) that every rank loading it whole gives."""
    runs = {}
    for low in ("true", "false"):
        out = tmp_path / f"low-{low}"
        result = train(
            cli,
            dataset,
            out,
            "method=full",
            "distributed.strategy=fsdp",
            f"distributed.low_memory_load={low}",
            "train.max_steps=6",
            "train.lr=1e-3",
        )
        assert result.code == 0, result
        runs[low] = out
    fast, slow = (metrics_of(runs[k]) for k in ("true", "false"))
    for (step, a), (_, b) in zip(fast["loss"], slow["loss"], strict=True):
        assert a == pytest.approx(b, abs=1e-5), step
    from safetensors.torch import load_file

    def weights(folder):
        return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}

    a, b = weights(runs["true"]), weights(runs["false"])
    assert a.keys() == b.keys() and a
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4, msg=key)


def test_low_memory_fsdp_assembles_a_moe_models_per_expert_checkpoint(cli, tmp_path):
    """Qwen3-MoE's checkpoint stores one tensor per expert (the hub's layout); rank 0 streaming
    it into the fused experts' FSDP shards gives the losses every rank loading it whole gives,
    and with LoRA the experts' pairs are trained."""
    name = "model.name_or_path=tiny://qwen3-moe"
    data = tmp_path / "data"
    assert run_prepare(data, name).code == 0
    losses = {}
    for low in ("true", "false"):
        out = tmp_path / f"low-{low}"
        sets = (name, "method=full", "distributed.strategy=fsdp", "train.max_steps=4",
                f"distributed.low_memory_load={low}", "train.lr=1e-3")  # fmt: skip
        result = train(cli, data, out, *sets)
        assert result.code == 0, result
        losses[low] = metrics_of(out)["loss"]
    for (step, a), (_, b) in zip(losses["true"], losses["false"], strict=True):
        assert a == pytest.approx(b, abs=1e-5), step
    out = tmp_path / "lora"
    sets = (name, "distributed.strategy=fsdp", "train.max_steps=6", "train.lr=0.003",
            "lora.dropout=0")  # fmt: skip
    result = train(cli, data, out, *sets)
    assert result.code == 0, result
    assert_expert_lora(out, "qwen3-moe")


def test_an_mxfp4_gpt_oss_checkpoint_trains_with_lora_loaded_either_way(cli, tmp_path):
    """gpt-oss with its experts in MXFP4 (tests/mxfp4.py): LoRA trains on the dequantized
    experts whether every rank loads the checkpoint (DDP: transformers dequantizes) or rank 0
    streams it into FSDP shards (kubetune dequantizes the blocks itself): the same base forward
    (step 1, before the adapter moves) both ways, and the experts' pairs trained."""
    from .mxfp4 import mxfp4_copy

    folder = mxfp4_copy(resolve_model("tiny://gpt-oss"), tmp_path / "gpt-oss-mxfp4")
    name = f"model.name_or_path={folder}"
    data = tmp_path / "data"
    assert run_prepare(data, name).code == 0
    first = {}
    for strategy in ("ddp", "fsdp"):
        out = tmp_path / strategy
        sets = (name, f"distributed.strategy={strategy}", "train.max_steps=4", "train.lr=0.003")
        result = train(cli, data, out, *sets)
        assert result.code == 0, result
        assert "experts are MXFP4; they are dequantized" in result.out or strategy == "fsdp"
        first[strategy] = metrics_of(out)["loss"][0][1]
        lora = load_file(out / "adapter_model.safetensors")
        assert any(".mlp.experts.lora_B" in k and v.abs().sum() > 0 for k, v in lora.items())
    assert first["ddp"] == pytest.approx(first["fsdp"], rel=1e-4)  # bf16 vs the model's dtype


def test_compiled_decoder_layers_train_like_eager_ones(cli, dataset, tmp_path):
    """train.compile=true: torch.compile'd decoder layers (inductor on the CPU here) give the
    eager run's losses."""
    runs = {}
    for compiled in ("true", "false"):
        out = tmp_path / f"compile-{compiled}"
        sets = ("distributed.procs_per_node=1", "train.max_steps=4", f"train.compile={compiled}")
        result = train(cli, dataset, out, *sets)
        assert result.code == 0, result
        runs[compiled] = metrics_of(out)
    assert runs["true"]["kernels"]["compile"] is True
    for (step, a), (_, b) in zip(runs["true"]["loss"], runs["false"]["loss"], strict=True):
        assert a == pytest.approx(b, rel=1e-4), step
    # flex_attention (the GPU path for packed rows) has no backward on the CPU: a clear error
    flex = train(cli, dataset, tmp_path / "flex", "model.attn_implementation=flex_attention")
    assert_user_error(flex, "flex_attention trains on CUDA only")


def test_data_and_model_must_belong_together(cli, dataset, tmp_path):
    """A dataset trains and evaluates only a model with its tokenizer and enough embeddings:
    one line naming both models, exit 2, before any worker starts and with no output left."""
    from transformers import AutoTokenizer

    record = json.loads((dataset / "stats.json").read_text())["tokenizer"]
    tokenizer = AutoTokenizer.from_pretrained(resolve_model("tiny://falcon"))
    assert record["model"] == "tiny://falcon" and record["vocab_size"] == len(tokenizer)
    out = tmp_path / "out"
    other = train(cli, dataset, out, "model.name_or_path=tiny://qwen2")
    assert_user_error(
        other, "prepared with the tokenizer of tiny://falcon", "model.name_or_path tiny://qwen2"
    )
    assert not out.exists()
    evaluated = cli(
        "evaluate",
        TINY_DEMO,
        "--model",
        resolve_model("tiny://qwen2"),
        "--dataset",
        dataset,
        "--output",
        tmp_path / "eval",
        "--set",
        "model.name_or_path=tiny://qwen2",
    )
    assert_user_error(evaluated, "not the tokenizer of model.name_or_path tiny://qwen2")
    assert not (tmp_path / "eval").exists()
    # the same tokenizer, but fewer embeddings than the data's largest token id
    largest = max(
        max(row["input_ids"]) for split in load_from_disk(str(dataset)).values() for row in split
    )
    small = tmp_path / "small-vocab"
    model = base_model("llama")
    model.resize_token_embeddings(largest)
    model.save_pretrained(small)
    AutoTokenizer.from_pretrained(resolve_model("tiny://llama")).save_pretrained(small)
    result = train(cli, dataset, out, f"model.name_or_path={small}")
    assert_user_error(result, f"holds token id {largest}", f"has {largest} embeddings")
    assert not out.exists()


def trained_with_lora(cli, tmp_path, arch: str):
    """tiny://ARCH prepared and trained with LoRA (12 steps, 2 gloo workers), its eval loss
    below the base model's: (the recipe's model setting, dataset, output, metrics)."""
    name = f"model.name_or_path=tiny://{arch}"
    data = tmp_path / "data"
    assert run_prepare(data, name).code == 0
    out = tmp_path / "lora"
    result = train(cli, data, out, name, "train.max_steps=12", "train.lr=0.003", "lora.dropout=0")
    assert result.code == 0, result
    metrics = metrics_of(out)
    assert metrics["eval_loss"] < eval_loss(base_model(arch), data)
    return name, data, out, metrics


# quantized linear layers of a 4-bit tiny MoE model: attention (and linear attention) and
# shared-expert layers, then every routed expert's gate_up and down (MoE layers x 4 x 2)
QUANTIZED = {"qwen3-moe": 8 + 2 * 4 * 2, "qwen3.5-moe": 4 + 3 * 3 + 4 * 3 + 4 * 4 * 2}


@pytest.mark.parametrize("arch", ["qwen3", "qwen3-moe", "qwen3.5-moe"])
def test_todays_qwen3_families_train_with_lora_and_qlora(cli, tmp_path, arch):
    """Qwen3, Qwen3-MoE (4 routed experts, top-2) and Qwen3.5-MoE (hybrid: Gated DeltaNet
    layers beside full attention, a shared expert) through the real CLI on 2 gloo workers:
    LoRA (`auto` of their records: on the MoE model attention and the routed experts, as
    peft's parameter LoRA) trains and lowers the eval loss below the base model's, the MoE
    model's router terms logged in metrics.json; QLoRA on the MoE model quantizes every expert
    and trains its expert LoRA too. Both adapters load in peft on the stock transformers model,
    every expert's pair trained (B moved off its zero init), the router not adapted."""
    name, data, out, metrics = trained_with_lora(cli, tmp_path, arch)
    assert metrics["trainable_params"] > 0 and metrics["world_size"] == 2
    if arch == "qwen3":
        assert metrics["objective_metrics"] is None and metrics["expert_tokens"] is None
        return
    logged = metrics["objective_metrics"]  # the routers' load-balancing loss and load
    assert {"router_aux_loss", "expert_load_max", "expert_load_min"} <= set(logged)
    assert [step for step, _ in logged["router_aux_loss"]] == [s for s, _ in metrics["loss"]]
    assert all(aux > 0 for _, aux in logged["router_aux_loss"])  # top-k = 2: even routing
    assert all(high >= 1.0 for _, high in logged["expert_load_max"])
    tokens = metrics["expert_tokens"]  # per MoE layer, per expert: the run's routed tokens
    layers = {"qwen3-moe": 2, "qwen3.5-moe": 4}[arch]
    assert len(tokens) == layers and all(len(row) == 4 for row in tokens)
    assert len({sum(row) for row in tokens}) == 1 and sum(tokens[0]) > 0  # top-2 of each token
    assert_expert_lora(out, arch)
    qlora = tmp_path / "qlora"  # every expert 4-bit
    result = train(
        cli, data, qlora, name, "method=qlora", "train.max_steps=12", "train.lr=0.003",
        "lora.dropout=0",
    )  # fmt: skip
    assert result.code == 0, result
    quantized = metrics_of(qlora)
    assert quantized["quantized_linear_modules"] == QUANTIZED[arch]
    assert quantized["eval_loss"] < eval_loss(base_model(arch), data)
    assert quantized["trainable_params"] == metrics["trainable_params"]
    assert_expert_lora(qlora, arch)


def assert_expert_lora(adapter: Path, arch: str) -> None:
    """The adapter's expert pairs, read back by peft on the stock model: both fused expert
    parameters of every MoE layer adapted, every expert's B trained; the router left alone."""
    from peft import PeftModel

    config = json.loads((adapter / "adapter_config.json").read_text())
    assert sorted(config["target_parameters"]) == [
        "mlp.experts.down_proj",
        "mlp.experts.gate_up_proj",
    ]
    model = PeftModel.from_pretrained(base_model(arch), adapter)
    wrapped = [m for n, m in model.named_modules() if hasattr(m, "parameter_name")]
    layers = model.config.num_hidden_layers  # every layer a MoE layer
    assert sorted(m.parameter_name for m in wrapped) == (
        ["down_proj"] * layers + ["gate_up_proj"] * layers
    )
    for module in wrapped:
        b = module.lora_B["default"].weight
        experts = module.num_experts
        per_expert = b.reshape(b.shape[0], -1, experts).abs().sum(dim=(0, 1))
        assert per_expert.shape == (experts,) and bool((per_expert > 0).all()), module
    routers = (".mlp.gate.", ".mlp.router.")
    assert not any(r in n for n, _ in model.named_parameters() if "lora_" in n for r in routers)


@pytest.mark.parametrize("arch", ["gemma3", "gpt-oss"])
def test_sliding_window_families_train_with_lora(cli, tmp_path, arch):
    """Gemma 3 (sliding layers beside a global one; SDPA) and gpt-oss (attention sinks, a
    sliding layer, transposed experts with biases; eager attention, its only CPU path) through
    the real CLI on 2 gloo workers, packed rows: LoRA lowers the eval loss below the base
    model's; gpt-oss's experts are adapted and its router is not. QLoRA on gpt-oss is refused:
    its experts are not the SwiGLU kind kubetune quantizes."""
    name, data, out, metrics = trained_with_lora(cli, tmp_path, arch)
    assert metrics["attn_implementation"] == ("eager" if arch == "gpt-oss" else "sdpa")
    if arch == "gpt-oss":
        assert_expert_lora(out, arch)
        refused = train(cli, data, tmp_path / "qlora", name, "method=qlora", "lora.dropout=0")
        assert_user_error(refused, "method=qlora", "mlp.experts.gate_up_proj", "method=lora")
        # LoRA dropout cannot reach the experts' pairs: the recipe's 0.05 is refused, not dropped
        refused = train(cli, data, tmp_path / "dropout", name, "lora.dropout=0.05")
        assert_user_error(refused, "lora.dropout: 0.05", "fused experts", "lora.dropout: 0")
        assert not (tmp_path / "dropout").exists()
