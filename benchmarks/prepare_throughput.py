"""Tokens per second of `prepare` against a plain `datasets.map` tokenization, in one run.

    python benchmarks/prepare_throughput.py [--rows 50000] [--repeat 3]
    python benchmarks/prepare_throughput.py --workload samsum [--scales 50000,200000,1000000]

The samsum workload (dialogue + summary rows, `data.max_seq_len=512`, packing) runs each side as
a whole process per scale and reports wall time and peak RSS: kubetune's `prepare` command
against `load_dataset("json")` + `Dataset.map(batched=True, num_proc=CPUs)` tokenizing the
joined prompt + summary (`truncation=True, max_length=512`) + `save_to_disk`.

Both sides start from the same generated alpaca JSONL file and the same tokenizer (tiny://falcon)
and end with a dataset saved to disk. The baseline is what a seed script does:
`load_dataset("json")`, then `Dataset.map(batched=True)` building the prompt and tokenizing
prompt + response, then `save_to_disk` — no masking, no packing. kubetune also masks the
prompt out of the labels, adds EOS, applies the length policy, splits and packs (best-fit
decreasing). Each side runs `--repeat` times; the table shows the best time of each.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

WORDS = [
    "the",
    "model",
    "learns",
    "to",
    "follow",
    "instructions",
    "about",
    "data",
    "pipelines",
    "clusters",
    "gpus",
    "adapters",
    "and",
    "evaluation",
    "with",
    "care",
    "while",
    "reading",
    "long",
    "documents",
    "quickly",
]


def generate(path: Path, rows: int) -> None:
    import random

    rng = random.Random(0)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(rows):
            text = lambda n: " ".join(rng.choice(WORDS) for _ in range(n))  # noqa: E731
            f.write(
                json.dumps(
                    {
                        "instruction": f"Task {i}: {text(rng.randint(5, 30))}",
                        "input": text(rng.randint(0, 40)),
                        "output": text(rng.randint(10, 80)),
                    }
                )
                + "\n"
            )


def run_baseline(data: Path, out: Path) -> int:
    from datasets import load_dataset
    from transformers import AutoTokenizer

    from kubetune.components.models import resolve_model
    from kubetune.components.prepare_dataset.formats import ALPACA_PROMPT, ALPACA_PROMPT_NO_INPUT

    # A fresh tokenizer per run, as kubetune loads one: neither side inherits a warm BPE cache.
    tokenizer = AutoTokenizer.from_pretrained(resolve_model("tiny://falcon"))
    ds = load_dataset("json", data_files=str(data), split="train", cache_dir=str(out / "cache"))

    def tokenize(batch):
        texts = [
            (ALPACA_PROMPT if inp else ALPACA_PROMPT_NO_INPUT).format(instruction=ins, input=inp)
            + outp
            + tokenizer.eos_token
            for ins, inp, outp in zip(
                batch["instruction"], batch["input"], batch["output"], strict=True
            )
        ]
        return tokenizer(texts, truncation=True, max_length=512)

    ds = ds.map(tokenize, batched=True, remove_columns=ds.column_names)
    ds.save_to_disk(str(out / "saved"))
    return sum(len(x) for x in ds["input_ids"])


def run_kubetune(data: Path, out: Path) -> int:
    from kubetune.components.config import load_recipe
    from kubetune.components.prepare_dataset.step import prepare

    cfg = load_recipe(
        "tiny-demo",
        [f"data.path={data}", "data.format=alpaca", "data.max_seq_len=512", "data.packing=true"],
    )
    stats = prepare(cfg, out / "prepared")
    return stats["tokens"]["total"]


def best_of(repeat: int, fn, data: Path) -> tuple[float, int]:
    best, tokens = float("inf"), 0
    for _ in range(repeat):
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            tokens = fn(data, Path(tmp))
            best = min(best, time.perf_counter() - start)
    return best, tokens


SPEAKERS = ["Amanda", "Tom", "Hannah", "Eric", "Lenny", "Will", "Jane", "Ollie"]


def generate_samsum(path: Path, rows: int) -> None:
    """samsum-format rows: a chat of 3-9 turns and a summary, about 330 tiny://falcon tokens
    each (the size of samsum's rows)."""
    import random

    rng = random.Random(0)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(rows):
            text = lambda n: " ".join(rng.choice(WORDS) for _ in range(n))  # noqa: E731
            turns = [
                f"{rng.choice(SPEAKERS)}: {text(rng.randint(2, 18))}"
                for _ in range(rng.randint(3, 9))
            ]
            summary = f"{rng.choice(SPEAKERS)} {text(rng.randint(6, 30))}. ({i})"
            f.write(json.dumps({"dialogue": "\r\n".join(turns), "summary": summary}) + "\n")


SAMSUM_BASELINE = r"""
import json, os, resource, sys, time
began = time.perf_counter()
from datasets import disable_caching, disable_progress_bars, load_dataset
from transformers import AutoTokenizer
from kubetune.components.models import resolve_model
from kubetune.components.prepare_dataset.formats import SAMSUM_PROMPT
disable_progress_bars()
data, out = sys.argv[1:3]
tokenizer = AutoTokenizer.from_pretrained(resolve_model("tiny://falcon"))
ds = load_dataset("json", data_files=data, split="train", cache_dir=os.path.join(out, "cache"))
def tokenize(batch):
    texts = [SAMSUM_PROMPT.format(dialogue=d) + s + tokenizer.eos_token
             for d, s in zip(batch["dialogue"], batch["summary"])]
    return tokenizer(texts, truncation=True, max_length=512)
ds = ds.map(tokenize, batched=True, remove_columns=ds.column_names, num_proc=os.cpu_count())
ds.save_to_disk(os.path.join(out, "saved"))
tokens = sum(len(x) for x in ds.with_format("arrow")["input_ids"].to_pylist())
print(json.dumps({"seconds": time.perf_counter() - began, "tokens": tokens,
                  "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "workers_rss": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}))
"""

SAMSUM_KUBETUNE = r"""
import json, resource, subprocess, sys, time
began = time.perf_counter()
data, out, kubetune = sys.argv[1:4]
sets = [f"data.path={data}", "data.format=samsum", "data.max_seq_len=512", "data.packing=true"]
subprocess.run([kubetune, "prepare", "tiny-demo", "--output", out + "/prepared",
                *[a for s in sets for a in ("--set", s)]], check=True, stdout=subprocess.DEVNULL)
stats = json.load(open(out + "/prepared/stats.json"))
print(json.dumps({"seconds": time.perf_counter() - began, "tokens": stats["tokens"]["total"],
                  "rss": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
                  "workers_rss": None}))
"""

# The floor both sides share: importing the tokenizer library and loading the tokenizer, then
# the Rust tokenizer alone over every segment kubetune tokenizes (all CPUs, its own threads; no
# reading, no masking, no writing: the texts are made before the clock starts).
SAMSUM_TOKENIZER_ONLY = r"""
import json, sys, time
began = time.perf_counter()
from tokenizers import Tokenizer
backend = Tokenizer.from_file(sys.argv[2] + "/tokenizer.json")
imported = time.perf_counter() - began
from kubetune.components.prepare_dataset.formats import samsum
texts = [t for line in open(sys.argv[1], encoding="utf-8") for t, _ in samsum(json.loads(line))]
began = time.perf_counter()
tokens = 0
for start in range(0, len(texts), 16384):
    tokens += sum(len(e.ids) for e in backend.encode_batch_fast(texts[start:start + 16384],
                                                                add_special_tokens=False))
print(json.dumps({"import_seconds": imported, "tokenize_seconds": time.perf_counter() - began,
                  "tokens": tokens}))
"""


def whole_process(script: str, *argv: str) -> dict:
    import subprocess

    proc = subprocess.run(
        [sys.executable, "-c", script, *argv], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        sys.exit(f"failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def samsum(scales: list[int], repeat: int = 1) -> int:
    """Whole processes per scale: wall time and peak RSS of each side, same run (the fastest
    of `repeat` runs per side)."""
    from kubetune.components.models import resolve_model

    model = resolve_model("tiny://falcon")  # built once, outside the timings
    kubetune = str(Path(sys.executable).parent / "kubetune")
    results = []
    for rows in scales:
        work = Path(tempfile.mkdtemp(prefix="kubetune-bench-"))
        try:
            data = work / "samsum.jsonl"
            generate_samsum(data, rows)
            runs = {"base": [], "kt": []}
            for _ in range(repeat):  # alternating, so a slow spell of the machine hits both
                for side, script, extra in (
                    ("base", SAMSUM_BASELINE, ()),
                    ("kt", SAMSUM_KUBETUNE, (kubetune,)),
                ):
                    shutil.rmtree(work / side, ignore_errors=True)
                    (work / side).mkdir()
                    runs[side].append(whole_process(script, str(data), str(work / side), *extra))
            base, ours = (min(runs[side], key=lambda m: m["seconds"]) for side in ("base", "kt"))
            floor = min(
                (whole_process(SAMSUM_TOKENIZER_ONLY, str(data), model) for _ in range(repeat)),
                key=lambda m: m["import_seconds"] + m["tokenize_seconds"],
            )
            floor["seconds"] = floor["import_seconds"] + floor["tokenize_seconds"]
        finally:
            shutil.rmtree(work, ignore_errors=True)
        results.append((rows, base, ours, floor))
        print(
            json.dumps({"rows": rows, "datasets_map": base, "kubetune": ours, "floor": floor}),
            flush=True,
        )
    print(
        f"prepare, samsum rows, max_seq_len 512, packing; whole processes, same run, fastest of "
        f"{repeat}; "
        f"{os.cpu_count()} CPUs, python {sys.version.split()[0]}"
    )
    print(
        "| rows | pipeline | seconds | tokens | peak RSS MB (main) | peak RSS MB (a worker) "
        "| speed vs map | time / floor |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for rows, base, ours, floor in results:
        for name, m in (("datasets.map num_proc", base), ("kubetune prepare", ours)):
            workers = f"{m['workers_rss'] / 2**20:,.0f}" if m["workers_rss"] else "-"
            print(
                f"| {rows:,} | {name} | {m['seconds']:.1f} | {m['tokens']:,} | "
                f"{m['rss'] / 2**20:,.0f} | {workers} | {base['seconds'] / m['seconds']:.2f}x | "
                f"{m['seconds'] / floor['seconds']:.2f}x |"
            )
        print(
            f"| {rows:,} | floor: import tokenizers + load {floor['import_seconds']:.2f} s, "
            f"Rust tokenizer alone {floor['tokenize_seconds']:.1f} s | {floor['seconds']:.1f} | "
            f"{floor['tokens']:,} | | | | 1.00x |"
        )
    first = results[0][2]["rss"]
    for rows, _, ours, _ in results[1:]:
        print(
            f"kubetune peak RSS at {rows:,} rows / at {results[0][0]:,}: {ours['rss'] / first:.2f}x"
        )
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--samsum-repeat",
        type=int,
        default=1,
        help="samsum: runs per side and scale, alternating sides; the fastest of each is shown",
    )
    parser.add_argument("--workload", choices=("alpaca", "samsum"), default="alpaca")
    parser.add_argument("--scales", default="50000,200000,1000000", help="samsum: rows per run")
    args = parser.parse_args(argv)
    if args.workload == "samsum":
        return samsum([int(n) for n in args.scales.split(",")], args.samsum_repeat)

    import datasets
    import transformers

    from kubetune.components.models import resolve_model

    datasets.disable_progress_bars()
    datasets.disable_caching()
    transformers.utils.logging.disable_progress_bar()
    resolve_model("tiny://falcon")  # build the tiny model once, outside the timings
    work = Path(tempfile.mkdtemp(prefix="kubetune-bench-"))
    try:
        data = work / "alpaca.jsonl"
        generate(data, args.rows)
        base_s, base_tokens = best_of(args.repeat, run_baseline, data)
        kt_s, kt_tokens = best_of(args.repeat, run_kubetune, data)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = [
        ("datasets.map (tokenize only)", base_s, base_tokens),
        ("kubetune prepare (mask+pack)", kt_s, kt_tokens),
    ]
    print(
        f"prepare throughput: {args.rows} alpaca rows, tiny://falcon tokenizer, "
        f"best of {args.repeat}, {os.cpu_count()} CPUs, python {sys.version.split()[0]}"
    )
    print(
        f"| {'pipeline':<30} | {'seconds':>8} | {'tokens':>10} | {'tokens/s':>10} | {'vs baseline':>11} |"
    )
    print(f"|{'-' * 32}|{'-' * 10}:|{'-' * 11}:|{'-' * 11}:|{'-' * 12}:|")
    base_rate = base_tokens / base_s
    for name, seconds, tokens in rows:
        rate = tokens / seconds
        print(
            f"| {name:<30} | {seconds:>8.2f} | {tokens:>10} | {rate:>10,.0f} | {rate / base_rate:>10.2f}x |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
