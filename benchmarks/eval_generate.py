"""Generation speed of the evaluate step's two engines: hf (transformers' generate, batched,
left-padded, as `eval.engine: hf` runs it) against vLLM (`eval.engine: vllm`).

    python benchmarks/eval_generate.py            # CUDA: Llama-3-8B's shape, 256 prompts x 128
    python benchmarks/eval_generate.py --smoke    # CPU: tiny Llama, 16 prompts x 16 (harness)

Both engines answer the same prompts (token ids, 64-192 tokens each, seeded) greedily with the
same weights: a random-initialised model of Llama-3-8B's configuration in bf16 (no download;
speed does not depend on the weights' values), saved once as safetensors. Each engine runs the
code the evaluate step runs: `components.evaluate.step.generate_ids` with `eval.batch_size` for hf
(at every --hf-batch size; the default 8 and a larger one), `generate_vllm` (a child process,
tensor parallel over the GPUs it sees) for vLLM. Reported: prompts/s and generated tokens/s,
vLLM both end to end (engine start, weights, CUDA graphs included: what evaluate waits for) and
generation only; then vLLM / best hf ratios. The first line names the machine, then one JSON
line per engine. The issue's goal: vLLM >= 10x hf.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.train_throughput import LLAMA3_8B, machine  # noqa: E402


def make_model(folder: Path, smoke: bool) -> Path:
    """The benchmark's model folder: tiny Llama (smoke) or Llama-3-8B's shape, random, bf16,
    with the tiny tokenizer (prompts are token ids; the tokenizer only decodes)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from kubetune.components.models import resolve_model
    from kubetune.components.planner.architecture import KNOWN_CONFIGS
    from kubetune.components.tiny_models import train_tiny_tokenizer

    if smoke:
        return Path(resolve_model("tiny://llama"))
    tokenizer = train_tiny_tokenizer()
    shape = dict(KNOWN_CONFIGS[LLAMA3_8B])  # Llama-3-8B's config.json, as kubetune plan knows it
    shape.pop("model_type")
    config = LlamaConfig(
        **shape,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del model
    torch.cuda.empty_cache()
    return folder


def prompts(count: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(8, vocab) for _ in range(rng.randint(64, 192))] for _ in range(count)]


def recipe(model: Path, new_tokens: int, batch: int, engine: str):
    from kubetune.components.config import load_recipe

    return load_recipe(
        REPO / "pipelines" / "recipes" / "tiny-demo.yaml",
        [
            f"model.name_or_path={model}",
            f"eval.max_new_tokens={new_tokens}",
            f"eval.batch_size={batch}",
            f"eval.engine={engine}",
        ],
    )


def generated(answers: list[list[int]], eos: int) -> int:
    return sum(ids.index(eos) if eos in ids else len(ids) for ids in answers)


def run_hf(model_dir: Path, asks, new_tokens: int, batch: int) -> dict:
    import torch

    from kubetune.components.evaluate.step import _device_and_dtype, generate_ids, load_model
    from kubetune.components.models import load_tokenizer

    cfg = recipe(model_dir, new_tokens, batch, "hf")
    tokenizer = load_tokenizer(cfg.model)
    device, dtype = _device_and_dtype()
    model = load_model(str(model_dir), cfg, dtype, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.monotonic()
    answers = generate_ids(model, tokenizer, asks, cfg)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.monotonic() - started
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    tokens = generated(answers, tokenizer.eos_token_id)
    return {"engine": f"hf, batch {batch}", "seconds": seconds, "tokens": tokens}


def run_vllm(model_dir: Path, asks, new_tokens: int) -> dict:
    from kubetune.components.evaluate.step import _device_and_dtype, locate
    from kubetune.components.evaluate.vllm_engine import generate_vllm
    from kubetune.components.models import load_tokenizer

    cfg = recipe(model_dir, new_tokens, 8, "vllm")
    tokenizer = load_tokenizer(cfg.model)
    _, dtype = _device_and_dtype()
    timing: dict = {}
    started = time.monotonic()
    answers = generate_vllm(locate(str(model_dir), cfg), cfg, asks, tokenizer, dtype, timing)
    end_to_end = time.monotonic() - started
    tokens = generated(answers, tokenizer.eos_token_id)
    return {
        "engine": "vllm",
        "seconds": timing["generate"],
        "end_to_end_seconds": end_to_end,
        "start_seconds": timing["start"],
        "tokens": tokens,
    }


def table(results: list[dict], count: int, new_tokens: int, device: str) -> str:
    lines = [
        f"eval generation on {device}: {count} prompts x {new_tokens} new tokens (greedy)",
        "| engine | seconds | prompts/s | generated tokens/s | end to end s | vs best hf |",
        "|---|---|---|---|---|---|",
    ]
    hf = [r for r in results if r["engine"].startswith("hf")]
    best = max((count / r["seconds"] for r in hf), default=None)
    for r in results:
        rate = count / r["seconds"]
        ratio = f"{rate / best:.1f}x" if best and r["engine"] == "vllm" else ""
        end = f"{r['end_to_end_seconds']:.1f}" if "end_to_end_seconds" in r else ""
        lines.append(
            f"| {r['engine']} | {r['seconds']:.1f} | {rate:.2f} | {r['tokens'] / r['seconds']:,.0f} "
            f"| {end} | {ratio} |"
        )
        if r["engine"] == "vllm" and best:
            lines.append(
                f"| vllm, end to end | {r['end_to_end_seconds']:.1f} | "
                f"{count / r['end_to_end_seconds']:.2f} | | | "
                f"{count / r['end_to_end_seconds'] / best:.1f}x |"
            )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny Llama on CPU (the harness)")
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--hf-batch", default="8,64", help="eval.batch_size values for hf")
    args = parser.parse_args(argv)
    import torch

    if args.smoke:
        args.prompts, args.new_tokens, args.hf_batch = 16, 16, "8"
    elif not torch.cuda.is_available():
        print("eval_generate needs a CUDA GPU (use --smoke on CPU)", file=sys.stderr)
        return 2
    info = machine(("torch", "transformers", "vllm", "lm_eval"))
    print(json.dumps({"machine": info, "prompts": args.prompts}), flush=True)
    vllm_here = importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()
    results = []
    with tempfile.TemporaryDirectory(prefix="kubetune-eval-bench-") as tmp:
        model_dir = make_model(Path(tmp) / "model", args.smoke)
        vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
        asks = prompts(args.prompts, min(vocab, 1024))
        for batch in (int(b) for b in args.hf_batch.split(",")):
            results.append(run_hf(model_dir, asks, args.new_tokens, batch))
            print(json.dumps(results[-1]), flush=True)
        if vllm_here:
            results.append(run_vllm(model_dir, asks, args.new_tokens))
            print(json.dumps(results[-1]), flush=True)
        else:
            print(json.dumps({"engine": "vllm", "skipped": "needs vLLM and CUDA"}), flush=True)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    print(table(results, args.prompts, args.new_tokens, device))
    if not vllm_here:
        print("| vllm | not run here: needs vLLM and a CUDA GPU | | | | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
