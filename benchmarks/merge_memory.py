"""Peak memory of kubetune's shard-by-shard merge against peft's merge_and_unload, in one run.

    python benchmarks/merge_memory.py [--layers 16]

Generates a Llama-architecture model of at least 1 GB (fp32, several safetensors shards) and a
random LoRA adapter (r=16 on every projection, made by peft), then merges it both ways, each
in its own process: `kubetune merge` and peft's `PeftModel.from_pretrained(base, adapter)
.merge_and_unload().save_pretrained(...)`. Reported: each process's peak RSS, and the same
above the RSS of a process that only imported the libraries (peak RSS is VmHWM).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

IMPORTS = "import torch, transformers, peft, safetensors\n"
# VmHWM: peak RSS of this process's own address space. (ru_maxrss would not do: Linux carries
# it across execve, so a child would report its parent's peak.)
REPORT = (
    "print(next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') "
    "if l.startswith('VmHWM')))\n"
)

KUBETUNE = (
    IMPORTS
    + """
import sys
from kubetune.pipelines.cli import main
code = main(["merge", sys.argv[1], "--adapter", sys.argv[2], "--output", sys.argv[3],
             "--set", "model.name_or_path=" + sys.argv[4]])
assert code == 0
"""
    + REPORT
)

PEFT = (
    IMPORTS
    + """
import sys
from peft import PeftModel
from transformers import AutoModelForCausalLM
base = AutoModelForCausalLM.from_pretrained(sys.argv[4], dtype=torch.float32)
model = PeftModel.from_pretrained(base, sys.argv[2]).merge_and_unload()
model.save_pretrained(sys.argv[3], safe_serialization=True, max_shard_size="300MB")
"""
    + REPORT
)


def make_model(folder: Path, layers: int) -> int:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from kubetune.components.models import resolve_model

    config = LlamaConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=layers,
        num_attention_heads=16,
        num_key_value_heads=16,
        vocab_size=32000,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(folder / "base", safe_serialization=True, max_shard_size="300MB")
    AutoTokenizer.from_pretrained(resolve_model("tiny://llama")).save_pretrained(folder / "base")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=targets))
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.01)
    peft_model.save_pretrained(folder / "adapter")
    return sum(f.stat().st_size for f in (folder / "base").glob("*.safetensors"))


def peak(script: str, *args: str) -> int:
    out = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(out.stdout[-2000:] + out.stderr[-2000:])
    return int(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=16, help="decoder layers (16: 1.3 GB fp32)")
    args = parser.parse_args(argv)
    recipe = str(
        Path(__file__).resolve().parent.parent / "pipelines" / "recipes" / "tiny-demo.yaml"
    )
    with tempfile.TemporaryDirectory(prefix="kubetune-merge-bench-") as tmp:
        work = Path(tmp)
        size = make_model(work, args.layers)
        shards = len(list((work / "base").glob("*.safetensors")))
        base = peak(IMPORTS + REPORT)
        ours = peak(KUBETUNE, recipe, str(work / "adapter"), str(work / "ours"), str(work / "base"))
        theirs = peak(PEFT, recipe, str(work / "adapter"), str(work / "peft"), str(work / "base"))
        summary = json.loads((work / "ours" / "merge.json").read_text())
    print(
        f"merge memory: Llama-architecture model {size / 1e9:.2f} GB fp32 in {shards} shards, "
        f"LoRA r=16 on {summary['merged_weights']} weights"
    )
    print("| merge | peak RSS GB | above imports GB |")
    print("|---|---:|---:|")
    print(f"| imports only | {base / 1e9:.2f} | 0.00 |")
    print(f"| peft merge_and_unload | {theirs / 1e9:.2f} | {(theirs - base) / 1e9:.2f} |")
    print(f"| kubetune merge (shard by shard) | {ours / 1e9:.2f} | {(ours - base) / 1e9:.2f} |")
    print(f"kubetune / peft, above imports: {(ours - base) / (theirs - base):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
