"""merge_adapter: fold a LoRA/QLoRA adapter into the base model's original weights, shard by shard.

For every safetensors shard of the (unquantized) base: read it, add `scale * B @ A` to each
weight the adapter targets (transposed for fan_in_fan_out layers, in fp32, cast back to the
shard's dtype), write it out under the same name. Peak memory is about one shard plus the
adapter, where peft's `merge_and_unload` holds the whole model. Falcon's fused
`query_key_value` is an ordinary weight here. The adapter is refused, with the reason, when it
was trained on another base, targets a tensor the base lacks, or its shapes do not fit.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ..config import RunConfig, write_resolved
from ..errors import UserError
from ..models import model_revision, model_source
from ..outputs import check_output, staged_output
from ..train.modeling import safetensors_files

PEFT_PREFIX = "base_model.model."
BASE_FILE = "base_model.json"  # written by the training worker beside the adapter
COPIED = ("config.json", "generation_config.json", "model.safetensors.index.json")


def read_adapter(adapter: Path) -> tuple[dict, dict[str, dict[str, torch.Tensor]], dict]:
    """(adapter_config, {base weight key: {"A", "B"}}, {base bias key: tensor})."""
    config_file, weights = adapter / "adapter_config.json", adapter / "adapter_model.safetensors"
    if not config_file.is_file() or not weights.is_file():
        raise UserError(
            f"{adapter}: not a LoRA adapter (needs adapter_config.json and "
            "adapter_model.safetensors)"
        )
    config = json.loads(config_file.read_text())
    if config.get("peft_type", "LORA") != "LORA" or config.get("use_dora"):
        raise UserError(
            f"{adapter}: only plain LoRA adapters can be merged "
            f"(peft_type {config.get('peft_type')}, use_dora {config.get('use_dora')})"
        )
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    biases: dict[str, torch.Tensor] = {}
    for key, tensor in load_file(str(weights)).items():
        name = key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key
        name = name.replace(".base_layer.", ".")  # peft's name for a wrapped layer's own bias
        for part in ("lora_A", "lora_B"):
            marker = f".{part}.weight"
            if name.endswith(marker):
                pairs.setdefault(name[: -len(marker)] + ".weight", {})[part[-1]] = tensor
                break
        else:
            if name.endswith(".bias"):
                biases[name] = tensor
            else:
                raise UserError(
                    f"{adapter}: unexpected tensor {key} (modules_to_save adapters are not merged)"
                )
    incomplete = [k for k, v in pairs.items() if set(v) != {"A", "B"}]
    if incomplete:
        raise UserError(f"{adapter}: {incomplete[0]} has lora_A or lora_B missing")
    return config, pairs, biases


def check_base(cfg: RunConfig, adapter: Path, config: dict, source: str) -> None:
    """The adapter must have been trained on the recipe's base model."""
    recorded = adapter / BASE_FILE
    if recorded.is_file():
        base = json.loads(recorded.read_text())
        if (base["name_or_path"], base.get("revision")) != (
            cfg.model.name_or_path,
            cfg.model.revision,
        ):
            raise UserError(
                f"{adapter}: trained on {base['name_or_path']} (revision "
                f"{base.get('revision')}), but the recipe's model is "
                f"{cfg.model.name_or_path} (revision {cfg.model.revision})"
            )
        if base.get("commit") and cfg.model.commit and base["commit"] != cfg.model.commit:
            raise UserError(
                f"{adapter}: trained on {base['name_or_path']} at commit {base['commit']}, but "
                f"the fetched model (model.local_dir) is commit {cfg.model.commit}"
            )
        return
    peft_base = config.get("base_model_name_or_path")
    if peft_base and peft_base not in (cfg.model.name_or_path, source):
        raise UserError(
            f"{adapter}: adapter_config.json names base {peft_base!r}, but the "
            f"recipe's model is {cfg.model.name_or_path!r}"
        )


def scaling(config: dict) -> float:
    r, alpha = config["r"], config["lora_alpha"]
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def delta(pair: dict[str, torch.Tensor], scale: float, fan_in_fan_out: bool) -> torch.Tensor:
    update = (pair["B"].float() @ pair["A"].float()) * scale
    return update.T if fan_in_fan_out else update


# Bytes per element of each safetensors dtype name.
DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}


def merge_shard(
    shard: Path,
    target: Path,
    pairs: dict,
    biases: dict,
    scale: float,
    fan_in_fan_out: bool,
    adapter: Path,
) -> list[str]:
    """Stream one safetensors shard to `target`, merging as it goes; returns the keys changed.

    Merging keeps every shape and dtype, so the header is written first and then each tensor,
    one at a time: peak memory is one tensor (plus the adapter), not the shard.
    """
    changed = []
    with safe_open(str(shard), framework="pt") as f:
        keys = list(f.keys())  # noqa: SIM118 (safe_open is not a dict)
        header, offset = {}, 0
        for key in keys:
            part = f.get_slice(key)
            dtype, shape = part.get_dtype(), part.get_shape()
            size = math.prod(shape) * DTYPE_BYTES[dtype]
            header[key] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
            offset += size
        if f.metadata():
            header["__metadata__"] = f.metadata()
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        with open(target, "wb") as out:
            out.write(len(encoded).to_bytes(8, "little"))
            out.write(encoded)
            for key in keys:
                tensor = f.get_tensor(key)
                if key in pairs:
                    update = delta(pairs[key], scale, fan_in_fan_out)
                    if update.shape != tensor.shape:
                        raise UserError(
                            f"{adapter}: LoRA update for {key} has shape "
                            f"{tuple(update.shape)}, the base weight {tuple(tensor.shape)}"
                        )
                    tensor = (tensor.float() + update).to(tensor.dtype)
                    changed.append(key)
                elif key in biases:
                    if biases[key].shape != tensor.shape:
                        raise UserError(
                            f"{adapter}: bias {key} has shape {tuple(biases[key].shape)}, "
                            f"the base's {tuple(tensor.shape)}"
                        )
                    tensor = biases[key].to(tensor.dtype)
                    changed.append(key)
                out.write(tensor.contiguous().view(-1).view(torch.uint8).numpy())
    return changed


def merge_adapter(
    cfg: RunConfig, adapter_dir: str | Path, output_dir: str | Path, overwrite: bool = False
) -> dict:
    """Write the merged model (shards, index, config, tokenizer) to output_dir; returns a summary."""
    adapter, output = Path(adapter_dir), Path(output_dir)
    check_output(output, overwrite)
    config, pairs, biases = read_adapter(adapter)
    source = model_source(cfg.model)
    check_base(cfg, adapter, config, source)
    scale, fan_in_fan_out = scaling(config), bool(config.get("fan_in_fan_out"))
    shards = safetensors_files(source, model_revision(cfg.model))
    base_keys = set()
    for shard in shards:  # headers only: cheap, and it refuses a wrong adapter before any work
        with safe_open(str(shard), framework="pt") as f:
            base_keys.update(f.keys())
    missing = sorted((set(pairs) | set(biases)) - base_keys)
    if missing:
        raise UserError(
            f"{adapter}: targets {missing[0]}, which the base model "
            f"{cfg.model.name_or_path} does not have"
        )
    with staged_output(output, overwrite) as staging:
        for shard in shards:
            merge_shard(shard, staging / shard.name, pairs, biases, scale, fan_in_fan_out, adapter)
        base_dir = shards[0].parent
        for name in COPIED:
            if (base_dir / name).is_file():
                shutil.copy2(base_dir / name, staging / name)
        tokenizer_source = adapter if (adapter / "tokenizer_config.json").is_file() else base_dir
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(str(tokenizer_source)).save_pretrained(staging)
        write_resolved(cfg, staging)
        trained = (
            json.loads(recorded.read_text()) if (recorded := adapter / BASE_FILE).is_file() else {}
        )
        if (adapter / "metrics.json").is_file():  # the training run's metrics travel along
            shutil.copy2(adapter / "metrics.json", staging / "training_metrics.json")
        if (adapter / "tensorboard").is_dir():  # and its TensorBoard events
            shutil.copytree(adapter / "tensorboard", staging / "tensorboard")
        summary = {
            "base": cfg.model.name_or_path,
            "revision": cfg.model.revision,
            "commit": cfg.model.commit or trained.get("commit"),
            "method": trained.get("method", cfg.method),
            "dataset_fingerprint": trained.get("dataset_fingerprint"),
            "adapter": str(adapter),
            "shards": len(shards),
            "merged_weights": len(pairs),
            "replaced_biases": len(biases),
            "scale": scale,
        }
        (staging / "merge.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary
