"""The DPO cases of train_throughput.py: kubetune's dpo objective with LoRA against TRL's
`DPOTrainer` (the reference TRL's way for a peft model: the adapters disabled), on the same
generated preference pairs and the same weights, each side in its own process.

TRL's side runs with its best stock settings: bf16, SDPA, gradient checkpointing, its own
tokenization of the pairs (prompt + answer, EOS added), the micro batch's pairs padded
(`padding_free` is off in trl 1.16), the log-probabilities through its fused LM head. Its
tokens are the real tokens of chosen and rejected sequences (its `num_tokens`); kubetune's the
real tokens of its rows (both documents of every pair)."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

WORDS = [
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


def prepare_rows(kubetune: str, run, recipe: str, data: Path, out: Path, sets: list[str]) -> Path:
    """`kubetune prepare RECIPE` of the generated `data` into `out`, packed, 1% held out."""
    sets = [f"data.path={data}", "data.packing=true", "data.eval_fraction=0.01", *sets]
    run(
        [kubetune, "prepare", recipe, "--output", str(out)]
        + [a for s in sets for a in ("--set", s)]
    )
    return out


def make_pairs(folder: Path, seq: int, pairs: int, kubetune: str, run) -> tuple[Path, Path]:
    """(the pairs as JSON Lines, the same prepared and packed by kubetune to `seq` tokens a
    sequence)."""
    rng = random.Random(0)
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "pairs.jsonl"
    with open(data, "w") as f:
        for i in range(pairs):
            prompt = f"Task {i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 90)))
            chosen = " " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(10, 60)))
            rejected = " " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(10, 60)))
            f.write(json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected}) + "\n")
    sets = [f"data.max_seq_len={seq}", f"data.max_prompt_len={seq // 2}"]
    return data, prepare_rows(kubetune, run, "tiny-dpo", data, folder / "prepared", sets)


BASELINE = r"""
import json, sys, time, torch
from datasets import load_dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import DPOConfig, DPOTrainer
from kubetune.components.architectures import family
from kubetune.components.train.flops import train_flops_per_token, gpu_peak
from kubetune.components.train.modeling import parameter_counts
model_dir, pairs, steps, micro, seq, r, alpha, dropout, beta, out = sys.argv[1:11]
steps, micro, seq = int(steps), int(micro), int(seq)
cuda = torch.cuda.is_available()
dtype = torch.bfloat16 if cuda else torch.float32
tokenizer = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa",
                                             device_map={"": 0} if cuda else None)
lora = LoraConfig(r=int(r), lora_alpha=float(alpha), lora_dropout=float(dropout), task_type="CAUSAL_LM",
                  target_modules=list(family(model.config.model_type).lora_targets))
class Clock(TrainerCallback):  # the same steady window as the worker: after the first 5 steps
    warm = None
    def on_step_end(self, args, state, control, **kw):
        if state.global_step == 5 and steps >= 10:
            if cuda: torch.cuda.synchronize()
            self.warm = (time.perf_counter(), trainer._total_train_tokens)
    def on_train_end(self, args, state, control, **kw):
        if cuda: torch.cuda.synchronize()
        self.end = (time.perf_counter(), trainer._total_train_tokens)
clock = Clock()
args = DPOConfig(output_dir=out, per_device_train_batch_size=micro, max_steps=steps, learning_rate=2e-4,
                 lr_scheduler_type="cosine", warmup_steps=0, bf16=cuda, logging_steps=1, save_strategy="no",
                 report_to=[], gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False},
                 beta=float(beta), max_length=2 * seq, use_cpu=not cuda, disable_tqdm=True,
                 dataloader_num_workers=1 if cuda else 0, dataloader_pin_memory=cuda)
trainer = DPOTrainer(model=model, args=args, processing_class=tokenizer, peft_config=lora,
                     train_dataset=load_dataset("json", data_files=pairs, split="train"), callbacks=[clock])
trainable, total = parameter_counts(trainer.model)
if cuda: torch.cuda.reset_peak_memory_stats()
result = trainer.train()
runtime = result.metrics["train_runtime"]
losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
tokens = trainer._total_train_tokens
tps = tokens / runtime
steady = (clock.end[1] - clock.warm[1]) / (clock.end[0] - clock.warm[0]) if clock.warm else None
peak = torch.cuda.max_memory_allocated() if cuda else None
device_peak = gpu_peak(torch.device("cuda", 0)) if cuda else None
flops = train_flops_per_token(trainer.model, total, trainable, seq)
print(json.dumps({"tokens_per_second": tps, "padded_tokens_per_second": None,
                  "examples_per_second": micro * steps / runtime, "rows_per_second": None,
                  "steady_tokens_per_second": steady, "peak_memory_bytes": peak,
                  "mfu": flops * tps / device_peak if device_peak else None,
                  "final_loss": sum(losses[-5:]) / len(losses[-5:]),
                  "quantized_linear_modules": 0, "linear_layers": 0}))
"""


def baseline_side(model: Path, pairs: Path, case, args, work: Path, run) -> dict:
    argv = [model, pairs, args.steps, case.micro, case.seq, case.r, case.alpha, case.dropout]
    argv += [0.1, work / f"trl-{case.label}"]
    out = run([sys.executable, "-c", BASELINE, *map(str, argv)])
    return json.loads(out.strip().splitlines()[-1])
