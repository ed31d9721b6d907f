"""The ops other training stacks' eager decoder layers dispatch (forward, backward), for the
speed model's calibration points that ran on them: counted the way tests/test_speed.py counts
transformers' layers for LAYER_OPS (a TorchDispatchMode over a 4-layer and a 2-layer tiny
model: benchmarks/count_stack_ops.py, raw output in docs/benchmarks/).

- "litgpt": litgpt 0.5.13's GPT (docs/benchmarks/2026-12-06-cpu-litgpt-ops.txt): one fused
  qkv linear, its own RMSNorm and RoPE. torchtune's layers are taken as these (not counted: its
  points compile, and a compiled layer's launches are counted per matmul).
- "lit-gpt": lit-gpt at commit 8641822 (2023-10, package lit_gpt; litgpt's name before 0.1),
  which ran litgpt's published resource tables (docs/benchmarks/2026-12-07-cpu-lit-gpt-ops.txt).

Each stack: its layer with every weight trained (full fine-tuning) and frozen (under an
adapter: no weight gradients); its LoRA's ops per adapted projection (q or v inside the fused
qkv) and its LLaMA-Adapter's ops per adapted layer, both over the frozen layer's.
"""

from __future__ import annotations

Ops = dict[str, tuple[float, float]]  # per family: (forward, backward)

LITGPT_OPS: Ops = {"llama": (74, 126), "falcon": (64, 86)}
LITGPT_FROZEN_OPS: Ops = {"llama": (74, 93), "falcon": (64, 64)}
LITGPT_LORA_OPS: Ops = {"llama": (9, 10), "falcon": (11, 12.5)}
LIT_GPT_OPS: Ops = {"llama": (71, 124), "falcon": (74, 99)}
LIT_GPT_FROZEN_OPS: Ops = {"llama": (71, 91), "falcon": (74, 77)}
LIT_GPT_LORA_OPS: Ops = {"llama": (11.5, 12.5), "falcon": (13.5, 15)}
LIT_GPT_ADAPTER_OPS: dict[str, Ops] = {
    "llama": {"adapter": (45, 45), "adapter_v2": (57, 101)},
    "falcon": {"adapter": (35, 41), "adapter_v2": (45, 83)},
}
STACK_OPS: dict[str, Ops] = {"litgpt": LITGPT_OPS, "torchtune": LITGPT_OPS, "lit-gpt": LIT_GPT_OPS}
STACK_FROZEN_OPS: dict[str, Ops] = {
    "litgpt": LITGPT_FROZEN_OPS,
    "torchtune": LITGPT_FROZEN_OPS,
    "lit-gpt": LIT_GPT_FROZEN_OPS,
}
STACK_LORA_OPS: dict[str, Ops] = {
    "litgpt": LITGPT_LORA_OPS,
    "torchtune": LITGPT_LORA_OPS,
    "lit-gpt": LIT_GPT_LORA_OPS,
}
STACK_ADAPTER_OPS: dict[str, dict[str, Ops]] = {"lit-gpt": LIT_GPT_ADAPTER_OPS}


# lit-gpt's LoRA on a fused qkv with only some of q, k, v adapted (its finetune/lora.py's
# default, query and value) pads the update with zeros through an index tensor it builds from a
# Python list of the adapted output features in every forward (`LoRAQKVLinear.zero_pad`:
# `torch.tensor(self.lora_ind, device=...)`; litgpt 0.2 cached it as a buffer). Host seconds per
# int converted, measured by benchmarks/count_stack_ops.py (torch.tensor of such a list on this
# project's CPU VM: 0.16-0.23 us per int in four runs); then a synchronous copy to the GPU
INDEX_LIST_SECONDS = 0.2e-6
INDEX_LIST_STACKS = ("lit-gpt",)
