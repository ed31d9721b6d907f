"""Training throughput of the kubetune worker against plain transformers Trainer + peft.

    python benchmarks/train_throughput.py                 # CUDA: Falcon-7B and Llama-3-8B
    python benchmarks/train_throughput.py --smoke         # CPU: tiny models, same harness

Both sides train the same random-initialised architecture (configs only, no download: the
weights are generated and saved as safetensors first), the same LoRA settings, on the same
prepared rows (packed to --seq tokens), for the same number of steps, on one device, in the
same run. Each side runs in its own process so peak memory is its own. Reported: tokens/s,
samples/s (rows of --seq tokens), MFU (GPU only) and peak memory, plus how many linear layers
each side really quantized: transformers' bitsandbytes path skips Falcon's FalconLinear layers.
The seeds' reference: 6.7 samples/s for Falcon-7B 4-bit on one H100.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
KUBETUNE = str(Path(sys.executable).parent / "kubetune")
MODELS = {"falcon-7b": "tiiuae/falcon-7b", "llama3-8b": "meta-llama/Meta-Llama-3-8B"}
SMOKE_MODELS = {"tiny-falcon": "tiny://falcon", "tiny-llama": "tiny://llama"}


def make_model(name: str, folder: Path) -> Path:
    """Random-initialised weights of the architecture, saved as safetensors + the tiny tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kubetune.components.models import resolve_model
    from kubetune.components.train.plan import model_config

    folder.mkdir(parents=True, exist_ok=True)
    if name.startswith("tiny://"):
        return Path(resolve_model(name))
    config = model_config(name)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder, safe_serialization=True)
    AutoTokenizer.from_pretrained(resolve_model("tiny://falcon")).save_pretrained(folder)
    del model
    torch.cuda.empty_cache()
    return folder


def make_dataset(folder: Path, seq: int, rows: int) -> Path:
    """Generated alpaca rows, prepared and packed by kubetune to `seq` tokens."""
    import random

    rng = random.Random(0)
    folder.mkdir(parents=True, exist_ok=True)
    words = [
        "the",
        "model",
        "trains",
        "on",
        "long",
        "instructions",
        "about",
        "clusters",
        "data",
        "and",
        "adapters",
    ]
    data = folder / "rows.jsonl"
    with open(data, "w") as f:
        for i in range(rows):
            text = " ".join(rng.choice(words) for _ in range(rng.randint(20, 120)))
            f.write(
                json.dumps({"instruction": f"Task {i}", "input": text, "output": text[::-1]}) + "\n"
            )
    out = folder / "prepared"
    run(
        [
            KUBETUNE,
            "prepare",
            "tiny-demo",
            "--output",
            str(out),
            "--set",
            f"data.path={data}",
            "--set",
            "data.format=alpaca",
            "--set",
            f"data.max_seq_len={seq}",
            "--set",
            "data.packing=true",
            "--set",
            "data.eval_fraction=0.01",
        ]
    )
    return out


def run(cmd: list[str], env: dict | None = None) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout


def kubetune_side(model: Path, dataset: Path, method: str, args, work: Path) -> dict:
    out = work / f"kubetune-{method}"
    sets = [
        f"model.name_or_path={model}",
        f"method={method}",
        "distributed.procs_per_node=1",
        f"train.max_steps={args.steps}",
        f"train.micro_batch_size={args.micro_batch}",
        "train.grad_accum=1",
        "train.save_steps=100000",
        "train.gradient_checkpointing=true",
        "lora.r=64",
        "lora.alpha=16",
        "lora.dropout=0.1",
        f"data.max_seq_len={args.seq}",
        "train.warmup_steps=0",
        "eval.num_prompts=1",
    ]
    run(
        [
            KUBETUNE,
            "train",
            "tiny-demo",
            "--dataset",
            str(dataset),
            "--output",
            str(out),
            *[a for s in sets for a in ("--set", s)],
        ]
    )
    return json.loads((out / "metrics.json").read_text())


BASELINE = r"""
import json, sys, time, torch
from datasets import load_from_disk
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import (AutoModelForCausalLM, BitsAndBytesConfig, DataCollatorForSeq2Seq,
                          AutoTokenizer, Trainer, TrainingArguments)
from kubetune.components.train.modeling import AUTO_TARGETS, count_quantized, parameter_counts
from kubetune.components.train.flops import train_flops_per_token, gpu_peak
model_dir, data_dir, method, steps, micro, seq, out = sys.argv[1:8]
cuda = torch.cuda.is_available()
dtype = torch.bfloat16 if cuda else torch.float32
quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=dtype) if method == "qlora" else None
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, quantization_config=quant,
                                             device_map={"": 0} if cuda else None, attn_implementation="sdpa")
quantized = count_quantized(model) if method == "qlora" else 0
if method == "qlora":
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
else:
    model.gradient_checkpointing_enable(); model.enable_input_require_grads()
model = get_peft_model(model, LoraConfig(r=64, lora_alpha=16, lora_dropout=0.1, task_type="CAUSAL_LM",
                                         target_modules=AUTO_TARGETS[model.config.model_type]))
trainable, total = parameter_counts(model)
train = load_from_disk(data_dir)["train"].remove_columns(["position_ids"])
tokenizer = AutoTokenizer.from_pretrained(model_dir)
args = TrainingArguments(output_dir=out, per_device_train_batch_size=int(micro), max_steps=int(steps),
                         learning_rate=2e-4, bf16=cuda, logging_steps=10**9, save_strategy="no",
                         report_to=[], gradient_checkpointing=True, dataloader_num_workers=0,
                         use_cpu=not cuda, lr_scheduler_type="cosine")
trainer = Trainer(model=model, args=args, train_dataset=train,
                  data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True))
if cuda: torch.cuda.reset_peak_memory_stats()
result = trainer.train()
runtime = result.metrics["train_runtime"]
rows = int(steps) * int(micro)
tokens = sum(len(train[i]["input_ids"]) for i in range(min(rows, len(train))))
tokens *= rows / min(rows, len(train))
tps = tokens / runtime
peak = torch.cuda.max_memory_allocated() if cuda else None
device_peak = gpu_peak(torch.device("cuda", 0)) if cuda else None
flops = train_flops_per_token(model, total, trainable, int(seq))
print(json.dumps({"tokens_per_second": tps, "samples_per_second": rows / runtime,
                  "peak_memory_bytes": peak, "mfu": flops * tps / device_peak if device_peak else None,
                  "quantized_linear_modules": quantized}))
"""


def baseline_side(model: Path, dataset: Path, method: str, args, work: Path) -> dict:
    out = run(
        [
            sys.executable,
            "-c",
            BASELINE,
            str(model),
            str(dataset),
            method,
            str(args.steps),
            str(args.micro_batch),
            str(args.seq),
            str(work / f"trainer-{method}"),
        ]
    )
    return json.loads(out.strip().splitlines()[-1])


def fmt(value, kind: str) -> str:
    if value is None:
        return "-"
    if kind == "gb":
        return f"{value / 1e9:.1f}"
    if kind == "pct":
        return f"{100 * value:.1f}%"
    return f"{value:,.1f}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--smoke", action="store_true", help="tiny models on CPU (checks the harness)"
    )
    parser.add_argument("--methods", default="qlora,lora")
    parser.add_argument("--models", help="comma-separated subset of the models (default: all)")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--micro-batch", type=int, default=1)
    args = parser.parse_args(argv)
    import torch

    if args.smoke:
        models, args.seq, args.steps = SMOKE_MODELS, min(args.seq, 256), min(args.steps, 4)
    elif not torch.cuda.is_available():
        print(
            "train_throughput needs a CUDA GPU (use --smoke to check the harness on CPU)",
            file=sys.stderr,
        )
        return 2
    else:
        models = MODELS
    if args.models:
        models = {k: v for k, v in models.items() if k in args.models.split(",")}
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    rows = []
    with tempfile.TemporaryDirectory(prefix="kubetune-train-bench-") as tmp:
        work = Path(tmp)
        dataset = make_dataset(
            work / "data",
            args.seq,
            rows=max(400, 4 * args.steps * args.micro_batch) * (args.seq // 256 or 1),
        )
        for label, name in models.items():
            model = make_model(name, work / label)
            for method in args.methods.split(","):
                ours = kubetune_side(model, dataset, method, args, work / label)
                theirs = baseline_side(model, dataset, method, args, work / label)
                rows.append((label, method, "transformers Trainer + peft", theirs))
                rows.append((label, method, "kubetune worker", ours))
    print(
        f"train throughput on {device}: seq {args.seq}, micro batch {args.micro_batch}, "
        f"{args.steps} steps, LoRA r=64, gradient checkpointing, bf16 where supported"
    )
    print("| model | method | trainer | tokens/s | samples/s | MFU | peak GB | 4-bit layers |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for label, method, who, m in rows:
        print(
            f"| {label} | {method} | {who} | {fmt(m['tokens_per_second'], 'n')} | "
            f"{fmt(m['samples_per_second'], 'n')} | {fmt(m['mfu'], 'pct')} | "
            f"{fmt(m['peak_memory_bytes'], 'gb')} | {m['quantized_linear_modules']} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
