"""Training speed and memory of the kubetune worker against transformers Trainer + peft.

    python benchmarks/train_throughput.py                 # CUDA: the cases below
    python benchmarks/train_throughput.py --smoke         # CPU: tiny models, same harness

Both sides train, in the same run and on the same GPU, the same random-initialised
architecture (configs only, no download: the weights are generated once and saved as
safetensors), with the same LoRA settings, on the same examples for the same number of
optimizer steps, each in its own process so peak memory is its own:
(a) transformers `Trainer` + peft with its best stock settings: bf16, SDPA, gradient
    checkpointing, packing by its own `DataCollatorWithFlattening` (one row per micro batch,
    position ids restarting per example), bitsandbytes 4-bit through `BitsAndBytesConfig`.
    transformers >= 5.5 quantizes only modules whose type is exactly `nn.Linear`, which would
    leave Falcon's `FalconLinear` layers in bf16 (and peft would upcast them to fp32): the
    baseline swaps that class for `nn.Linear` (the same y = x W^T + b) before loading, so
    every linear layer is 4-bit as in a real QLoRA run;
(b) kubetune's worker (`kubetune train`, every setting at its default: kernels, compile,
    checkpointing auto) on the rows `kubetune prepare` packed to the case's sequence length,
    at the case's micro batch; then once more with `train.micro_batch_size: auto`.
The harness fails when either side has fewer 4-bit layers than the model has linear layers
(the output head aside): a QLoRA comparison that is not QLoRA is no comparison.

Reported per side: real tokens/s (tokens of the examples) and computed tokens/s (padding
included) over the whole run, steady tokens/s after the first 5 steps (compiles,
autotuning), samples/s both as dataset examples and as full rows of --seq tokens, MFU from
model FLOPs (6N + attention per real token; recomputation not counted), peak memory, the mean
loss of the last 5 steps and the 4-bit layer count; then kubetune / Trainer ratios. Each
finished case is also printed as one JSON line, after a first line naming the machine. The
seeds' reference: 6.7 samples/s for Falcon-7B 4-bit, micro batch 4, sequence 512, on one H100.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from kubetune.components.artifacts import METRICS_FILE

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dpo_sides import WORDS, make_pairs, prepare_rows  # noqa: E402
from dpo_sides import baseline_side as dpo_baseline_side  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
KUBETUNE = str(Path(sys.executable).parent / "kubetune")
LLAMA3_8B, FALCON_7B = "meta-llama/Meta-Llama-3-8B", "tiiuae/falcon-7b"
QWEN3_MOE = "Qwen/Qwen3-30B-A3B"
LAMBDA_H100_SAMPLES_PER_S = 6.7  # Falcon-7B QLoRA, micro batch 4, seq 512, one H100


@dataclass(frozen=True)
class Case:
    label: str
    model: str
    method: str
    r: int
    alpha: float
    dropout: float
    seq: int
    micro: int
    targets: str = "auto"  # the architecture's attention and MLP projections
    layers: int | None = None  # fewer decoder layers than the model (each layer as published)
    objective: str = "sft"  # dpo: against TRL's DPOTrainer (dpo_sides.py), pairs of `seq` each


CASES = [
    Case("llama3-8b-lora-r16", LLAMA3_8B, "lora", 16, 32, 0.05, 2048, 2),
    Case("llama3-8b-qlora-r16", LLAMA3_8B, "qlora", 16, 32, 0.05, 2048, 2),
    Case("falcon-7b-qlora-r64", FALCON_7B, "qlora", 64, 16, 0.1, 2048, 2),
    Case("falcon-7b-qlora-mb4-s512", FALCON_7B, "qlora", 64, 16, 0.1, 512, 4),
]
# `--cases` picks these too (not in the default run): Qwen3-30B-A3B's layers (128 experts,
# top-8), 12 of its 48, QLoRA on attention: the Trainer side's bitsandbytes leaves every expert
# in bf16 (transformers v5's fused experts are not nn.Linear), kubetune's quantizes them, so the
# peak memories differ by the experts; both adapt the same attention projections.
MOE_CASES = [
    Case(
        "qwen3-30b-a3b-12-layers-qlora-r8",
        QWEN3_MOE,
        "qlora",
        8,
        16,
        0.0,
        2048,
        1,
        targets="[q_proj,k_proj,v_proj,o_proj]",
        layers=12,
    ),  # fmt: skip
]
# `--cases` picks these too (and benchmarks/gpu_check.sh runs them): DPO with LoRA against TRL's
# DPOTrainer (dpo_sides.py); micro batch in pairs, seq per sequence (prompt + answer).
DPO_CASES = [
    Case("llama3-8b-dpo-lora-r16", LLAMA3_8B, "lora", 16, 32, 0.0, 1024, 2, objective="dpo")
]
SMOKE_CASES = [
    Case("tiny-llama-lora", "tiny://llama", "lora", 16, 32, 0.05, 256, 2),
    Case("tiny-falcon-qlora", "tiny://falcon", "qlora", 64, 16, 0.1, 256, 2),
    Case("tiny-llama-dpo-lora", "tiny://llama", "lora", 16, 32, 0.0, 128, 2, objective="dpo"),
]


def make_model(name: str, folder: Path, layers: int | None = None) -> Path:
    """Random-initialised weights of the architecture (`layers` of its decoder layers, where
    given), saved as safetensors + the tiny tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kubetune.components.models import resolve_model
    from kubetune.components.planner.architecture import model_config

    folder.mkdir(parents=True, exist_ok=True)
    if name.startswith("tiny://"):
        return Path(resolve_model(name))
    config = model_config(name)
    if layers is not None:
        config.num_hidden_layers = layers
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder, safe_serialization=True)
    AutoTokenizer.from_pretrained(resolve_model("tiny://falcon")).save_pretrained(folder)
    del model
    torch.cuda.empty_cache()
    return folder


def make_dataset(folder: Path, seq: int, examples: int) -> Path:
    """Generated alpaca rows, prepared and packed by kubetune to `seq` tokens."""
    import random

    rng = random.Random(0)
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "rows.jsonl"
    with open(data, "w") as f:
        for i in range(examples):
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 120)))
            f.write(
                json.dumps({"instruction": f"Task {i}", "input": text, "output": text[::-1]}) + "\n"
            )
    sets = ["data.format=alpaca", f"data.max_seq_len={seq}"]
    return prepare_rows(KUBETUNE, run, "tiny-demo", data, folder / "prepared", sets)


def run(cmd: list[str], env: dict | None = None) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout


def kubetune_side(
    model: Path, dataset: Path, case: Case, args, work: Path, micro: str | None = None
) -> dict:
    """The worker on the case; `micro` overrides the case's micro batch (auto)."""
    out = work / f"kubetune-{case.label}-{micro or case.micro}"
    cuda = _cuda()
    sets = [
        f"model.name_or_path={model}",
        f"method={case.method}",
        "distributed.procs_per_node=1",
        f"data.max_seq_len={case.seq}",
        f"train.max_steps={args.steps}",
        f"train.micro_batch_size={micro or case.micro}",
        "train.grad_accum=1",
        "train.lr=2e-4",
        "train.lr_scheduler=cosine",
        "train.warmup_steps=0",
        "train.logging_steps=1",
        "train.save_steps=100000",
        f"quant.compute_dtype={'bfloat16' if cuda else 'float32'}",
        f"lora.r={case.r}",
        f"lora.alpha={case.alpha}",
        f"lora.dropout={case.dropout}",
        f"lora.target_modules={case.targets}",
    ]
    if micro == "auto" and not cuda:  # no GPU memory to fit: keep the smoke run small
        sets.append(f"train.global_batch_size={case.micro}")
    recipe = "tiny-dpo" if case.objective == "dpo" else "tiny-demo"
    if case.objective == "dpo":
        sets += ["preference.beta=0.1", f"data.max_prompt_len={case.seq // 2}"]
    run(
        [KUBETUNE, "train", recipe, "--dataset", str(dataset), "--output", str(out)]
        + [a for s in sets for a in ("--set", s)]
    )
    if args.keep:  # the run's own record, for fit_speed_model.py --add-run
        args.keep.mkdir(parents=True, exist_ok=True)
        shutil.copy(out / METRICS_FILE, args.keep / f"{out.name}.{METRICS_FILE}")
    metrics = json.loads((out / METRICS_FILE).read_text())
    losses = [loss for _, loss in metrics["loss"]]
    metrics["final_loss"] = sum(losses[-5:]) / len(losses[-5:])
    metrics["rows_per_second"] = metrics["tokens_per_second"] / case.seq
    if case.objective == "dpo":  # a row holds pairs: 2 x seq tokens
        metrics["rows_per_second"] /= 2
    metrics["linear_layers"] = linear_layer_count(model)
    return metrics


def linear_layer_count(model: Path) -> int:
    """Linear layers of the architecture (the output head aside), counted on the meta device."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from kubetune.components.architectures import linear_layer_names

    with init_empty_weights():
        meta = AutoModelForCausalLM.from_config(
            AutoConfig.from_pretrained(model), dtype=torch.bfloat16
        )
    return len(linear_layer_names(meta))


def check_quantized(case: Case, side: str, metrics: dict) -> str | None:
    """Why this side is not the QLoRA it claims to be, or None."""
    if case.method != "qlora":
        return None
    have, want = metrics["quantized_linear_modules"], metrics["linear_layers"]
    if have < want:
        return f"{case.label}: {side} has {have} 4-bit layers of {want} linear layers"
    return None


BASELINE = r"""
import json, sys, time, torch
from datasets import Dataset, load_from_disk
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import (AutoModelForCausalLM, BitsAndBytesConfig, DataCollatorWithFlattening,
                          Trainer, TrainerCallback, TrainingArguments)
from transformers.models.falcon import modeling_falcon
from kubetune.components.architectures import family, linear_layer_names
from kubetune.components.train.modeling import count_quantized, parameter_counts
# transformers quantizes only modules of type nn.Linear: FalconLinear (the same x W^T + b)
# becomes nn.Linear so every Falcon linear layer is 4-bit, as QLoRA means.
modeling_falcon.FalconLinear = torch.nn.Linear
from kubetune.components.train.flops import train_flops_per_token, gpu_peak
model_dir, data_dir, method, steps, micro, seq, r, alpha, dropout, out = sys.argv[1:11]
steps, micro, seq = int(steps), int(micro), int(seq)
cuda = torch.cuda.is_available()
dtype = torch.bfloat16 if cuda else torch.float32
# The same examples kubetune trains on: its packed rows split back at each position id 0.
packed = load_from_disk(data_dir)["train"]
examples = []
for row in packed:
    starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["input_ids"])]
    for a, b in zip(starts, starts[1:]):
        examples.append({"input_ids": row["input_ids"][a:b], "labels": row["labels"][a:b]})
per_step = max(1, round(micro * len(examples) / len(packed)))  # same tokens per step

quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=dtype) if method == "qlora" else None
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, quantization_config=quant,
                                             device_map={"": 0} if cuda else None, attn_implementation="sdpa")
quantized = count_quantized(model) if method == "qlora" else 0
linear_layers = len(linear_layer_names(model))
if method == "qlora":
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
model = get_peft_model(model, LoraConfig(r=int(r), lora_alpha=float(alpha), lora_dropout=float(dropout),
                                         task_type="CAUSAL_LM", target_modules=list(family(model.config.model_type).lora_targets)))
trainable, total = parameter_counts(model)
# Tokens come from Trainer's own count (the collator runs in a DataLoader worker process on
# GPU, so a counter there would never reach this process).
flatten = DataCollatorWithFlattening(return_position_ids=True)
class Clock(TrainerCallback):  # the same steady window as the worker: after the first 5 steps
    warm = None
    def on_step_end(self, args, state, control, **kw):
        if state.global_step == 5 and steps >= 10:
            if cuda: torch.cuda.synchronize()
            self.warm = (time.perf_counter(), state.num_input_tokens_seen)
    def on_train_end(self, args, state, control, **kw):
        if cuda: torch.cuda.synchronize()
        self.end = (time.perf_counter(), state.num_input_tokens_seen)
clock = Clock()
args = TrainingArguments(output_dir=out, per_device_train_batch_size=per_step, max_steps=steps,
                         learning_rate=2e-4, lr_scheduler_type="cosine", warmup_steps=0, bf16=cuda,
                         logging_steps=1, save_strategy="no", report_to=[], gradient_checkpointing=True,
                         gradient_checkpointing_kwargs={"use_reentrant": False},
                         dataloader_num_workers=1 if cuda else 0, dataloader_pin_memory=cuda,
                         use_cpu=not cuda, remove_unused_columns=False, disable_tqdm=True,
                         include_num_input_tokens_seen=True)
trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_list(examples),
                  data_collator=flatten, callbacks=[clock])
if cuda: torch.cuda.reset_peak_memory_stats()
result = trainer.train()
runtime = result.metrics["train_runtime"]
losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
tokens = trainer.state.num_input_tokens_seen
tps = tokens / runtime
steady = None
if clock.warm:
    steady = (clock.end[1] - clock.warm[1]) / (clock.end[0] - clock.warm[0])
peak = torch.cuda.max_memory_allocated() if cuda else None
device_peak = gpu_peak(torch.device("cuda", 0)) if cuda else None
flops = train_flops_per_token(model, total, trainable, seq)
print(json.dumps({"tokens_per_second": tps, "padded_tokens_per_second": tps,  # no padding
                  "examples_per_second": per_step * steps / runtime, "rows_per_second": tps / seq,
                  "steady_tokens_per_second": steady,
                  "peak_memory_bytes": peak, "mfu": flops * tps / device_peak if device_peak else None,
                  "final_loss": sum(losses[-5:]) / len(losses[-5:]),
                  "quantized_linear_modules": quantized, "linear_layers": linear_layers}))
"""


def baseline_side(model: Path, dataset: Path, case: Case, args, work: Path) -> dict:
    argv = [model, dataset, case.method, args.steps, case.micro, case.seq, case.r, case.alpha]
    argv += [case.dropout, work / f"trainer-{case.label}"]
    out = run([sys.executable, "-c", BASELINE, *map(str, argv)])
    return json.loads(out.strip().splitlines()[-1])


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def fmt(value, kind: str) -> str:
    if value is None:
        return "-"
    if kind == "gb":
        return f"{value / 1e9:.1f}"
    if kind == "pct":
        return f"{100 * value:.1f}%"
    if kind == "x":
        return f"{value:.2f}x"
    if kind == "loss":
        return f"{value:.4f}"
    return f"{value:,.1f}"


def ratio(a, b):
    return a / b if a is not None and b else None


def report(results: list, device: str, args) -> str:
    lines = [
        f"train throughput on {device}: {args.steps} optimizer steps per side, bf16 where "
        "supported, same examples and weights; Trainer with gradient checkpointing, kubetune "
        "with its defaults (checkpointing auto)",
        "",
        "| case | trainer | micro | tokens/s | computed tokens/s | steady tokens/s | "
        "examples/s | rows/s | MFU | peak GB | loss (last 5) | 4-bit layers |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for case, sides in results:
        for who, m in sides:
            micro = m.get("micro_batch", {}).get("micro_batch_size", case.micro)
            lines.append(
                f"| {case.label} | {who} | {micro} | {fmt(m['tokens_per_second'], 'n')} | "
                f"{fmt(m.get('padded_tokens_per_second'), 'n')} | "
                f"{fmt(m.get('steady_tokens_per_second'), 'n')} | "
                f"{fmt(m.get('examples_per_second'), 'n')} | "
                f"{fmt(m.get('rows_per_second'), 'n')} | {fmt(m['mfu'], 'pct')} | "
                f"{fmt(m['peak_memory_bytes'], 'gb')} | {fmt(m['final_loss'], 'loss')} | "
                f"{m['quantized_linear_modules']} |"
            )
    lines += [
        "",
        "MFU: model FLOPs (6N + attention) per real token; recomputation is not counted.",
        "",
        "| case | kubetune run | tokens/s kubetune/Trainer | steady tokens/s kubetune/Trainer | "
        "peak memory kubetune/Trainer | loss kubetune/Trainer |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for case, sides in results:
        theirs = sides[0][1]
        for who, ours in sides[1:]:
            steady = ratio(
                ours.get("steady_tokens_per_second"), theirs.get("steady_tokens_per_second")
            )
            tps = ratio(ours["tokens_per_second"], theirs["tokens_per_second"])
            memory = ratio(ours["peak_memory_bytes"], theirs["peak_memory_bytes"])
            lines.append(
                f"| {case.label} | {who} | {fmt(tps, 'x')} | {fmt(steady, 'x')} | "
                f"{fmt(memory, 'x')} | {fmt(ratio(ours['final_loss'], theirs['final_loss']), 'x')} |"
            )
    for case, sides in results:
        if case.label == "falcon-7b-qlora-mb4-s512":
            ours = sides[1][1]
            lines += [
                "",
                f"Falcon-7B QLoRA, micro batch 4, seq 512: kubetune "
                f"{fmt(ours['rows_per_second'], 'n')} full 512-token rows/s, "
                f"{fmt(ours.get('padded_tokens_per_second'), 'n')} computed tokens/s, against "
                f"Lambda's published {LAMBDA_H100_SAMPLES_PER_S} samples/s on one H100 (goal: "
                "13.4 rows/s, about 6,900 computed tokens/s, on an H100)",
            ]
    return "\n".join(lines)


TRAINING_PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "liger-kernel")


def machine(packages: tuple[str, ...] = TRAINING_PACKAGES) -> dict:
    """The GPU, its driver and the versions that ran (the first JSON line)."""
    import importlib.metadata

    import torch

    versions = {}
    for name in packages:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    info = {"gpu": None, "driver": None, "cuda": torch.version.cuda, "versions": versions}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        with contextlib.suppress(OSError):
            info["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
            ).stdout.strip()
    return info


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--smoke", action="store_true", help="tiny models on CPU (checks the harness)"
    )
    parser.add_argument("--cases", help="comma-separated subset of the case labels")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument(
        "--keep",
        type=Path,
        help="copy each kubetune side's metrics.json here (KEEP/kubetune-CASE-MICRO.metrics.json)",
    )
    args = parser.parse_args(argv)
    import torch

    if args.smoke:
        cases, args.steps = SMOKE_CASES, min(args.steps, 6)
    elif not torch.cuda.is_available():
        print(
            "train_throughput needs a CUDA GPU (use --smoke to check the harness on CPU)",
            file=sys.stderr,
        )
        return 2
    else:
        cases = CASES
    if args.cases:
        wanted = args.cases.split(",")
        cases = cases + ([] if args.smoke else MOE_CASES + DPO_CASES)
        unknown = sorted(set(wanted) - {c.label for c in cases})
        if unknown:
            print(f"--cases: unknown {', '.join(unknown)}", file=sys.stderr)
            return 2
        cases = [c for c in cases if c.label in wanted]
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    print(json.dumps({"machine": machine(), "steps": args.steps}), flush=True)
    results, unfair = [], []
    with tempfile.TemporaryDirectory(prefix="kubetune-train-bench-") as tmp:
        work = Path(tmp)
        models, datasets = {}, {}
        for case in cases:
            key = (case.model, case.layers)
            if key not in models:
                models[key] = make_model(case.model, work / f"model-{len(models)}", case.layers)
            data_key = (case.seq, case.objective)
            if data_key not in datasets and case.objective == "dpo":
                pairs = args.steps * case.micro * max(1, case.seq // 128) + 200
                folder = work / f"pairs-{case.seq}"
                datasets[data_key] = make_pairs(folder, case.seq, pairs, KUBETUNE, run)
            elif data_key not in datasets:
                # examples average ~150 tokens: enough of them for every step's packed rows
                examples = args.steps * case.micro * max(1, case.seq // 128) + 200
                datasets[data_key] = make_dataset(work / f"data-{case.seq}", case.seq, examples)
            model = models[(case.model, case.layers)]
            if case.objective == "dpo":
                text, dataset = datasets[data_key]
                ours = kubetune_side(model, dataset, case, args, work)
                theirs = dpo_baseline_side(model, text, case, args, work, run)
            else:
                dataset = datasets[data_key]
                ours = kubetune_side(model, dataset, case, args, work)
                theirs = baseline_side(model, dataset, case, args, work)
            # the auto micro batch is the SFT cases' (it calibrates the speed model)
            auto = (
                kubetune_side(model, dataset, case, args, work, micro="auto")
                if case.objective == "sft"
                else None
            )
            sides = [
                (
                    "TRL DPOTrainer + peft"
                    if case.objective == "dpo"
                    else "transformers Trainer + peft",
                    theirs,
                ),
                ("kubetune worker", ours),
                ("kubetune worker, micro batch auto", auto),
            ]
            sides = [(who, m) for who, m in sides if m is not None]
            results.append((case, sides))
            # one line per finished case, so a run cut short still leaves its numbers
            print(
                json.dumps(
                    {"case": case.label, "trainer": theirs, "kubetune": ours, "kubetune_auto": auto}
                ),
                flush=True,
            )
            unfair += [why for who, m in sides if (why := check_quantized(case, who, m))]
    print(report(results, device, args))
    if unfair:
        print("not a fair QLoRA comparison:\n" + "\n".join(unfair), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
