"""A tiny gpt-oss checkpoint with its experts in MXFP4, as OpenAI publishes gpt-oss: per fused
expert tensor `_blocks` (experts x out x in/32 x 16 bytes, two FP4 e2m1 codes each) and
`_scales` (one e8m0 power of two per 32 weights, biased by 127). Packed here, by rounding each
weight to the nearest FP4 value after the block's scale; transformers' own dequantization is
the reference the tests compare against."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

FP4 = torch.tensor(
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]
)


def pack(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(blocks, scales) of an experts x out x in tensor."""
    experts, out, inner = weight.shape
    groups = weight.float().reshape(experts, out, inner // 32, 32)
    peak = groups.abs().amax(-1).clamp_min(2.0**-120)
    exponent = torch.ceil(torch.log2(peak / 6.0)).clamp(-127, 127)
    scaled = groups / torch.exp2(exponent)[..., None]
    codes = (scaled[..., None] - FP4).abs().argmin(-1)
    blocks = (codes[..., 0::2] | (codes[..., 1::2] << 4)).to(torch.uint8)
    return blocks, (exponent + 127).to(torch.uint8)


def mxfp4_copy(source: str | Path, folder: Path) -> Path:
    """tiny://gpt-oss's folder with its experts' weights MXFP4 (biases stay bf16)."""
    shutil.copytree(source, folder)
    tensors = load_file(str(folder / "model.safetensors"))
    for key in [k for k in tensors if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        blocks, scales = pack(tensors.pop(key).transpose(1, 2))  # stored experts x in x out
        tensors[f"{key}_blocks"], tensors[f"{key}_scales"] = blocks, scales
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "mxfp4",
        "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                   "model.embed_tokens", "lm_head"],
    }  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder
