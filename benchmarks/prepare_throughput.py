"""Tokens per second of `prepare` against a plain `datasets.map` tokenization, in one run.

    python benchmarks/prepare_throughput.py [--rows 50000] [--repeat 3]

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
    from kubetune.components.prepare_dataset import prepare_dataset

    cfg = load_recipe(
        "tiny-demo",
        [f"data.path={data}", "data.format=alpaca", "data.max_seq_len=512", "data.packing=true"],
    )
    stats = prepare_dataset(cfg, out / "prepared")
    return stats["tokens"]["total"]


def best_of(repeat: int, fn, data: Path) -> tuple[float, int]:
    best, tokens = float("inf"), 0
    for _ in range(repeat):
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            tokens = fn(data, Path(tmp))
            best = min(best, time.perf_counter() - start)
    return best, tokens


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)

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
