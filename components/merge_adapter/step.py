"""merge_adapter: fold a LoRA/QLoRA adapter into the base model's original weights, shard by shard.

For every safetensors shard of the (unquantized) base: read it, add `scale * B @ A` to each
weight the adapter targets (transposed for fan_in_fan_out layers, in fp32, cast back to the
shard's dtype), write it out under the same name. Peak memory is about one shard plus the
adapter, where peft's `merge_and_unload` holds the whole model. Falcon's fused
`query_key_value` is an ordinary weight here. The adapter is refused, with the reason, when it
was trained on another base, targets a tensor the base lacks, or its shapes do not fit.
"""

from __future__ import annotations

import functools
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ..architectures import family
from ..artifacts import (
    ADAPTER_SPEC_FILE,
    ADAPTER_WEIGHTS_FILE,
    MERGE_FILE,
    METRICS_FILE,
    PEFT_CONFIG_FILE,
    PEFT_WEIGHTS_FILE,
    TRAINING_METRICS_FILE,
    BaseModelRecord,
    model_folder,
    write_json,
)
from ..config import RunConfig, write_resolved
from ..errors import UserError
from ..models import load_config, model_revision, model_source, safetensors_files
from ..outputs import check_output, staged_output
from .experts import ExpertMerge, split_expert_pairs

PEFT_PREFIX = "base_model.model."
COPIED = ("config.json", "generation_config.json", "model.safetensors.index.json")


def read_adapter(adapter: Path, base_family) -> tuple[dict, dict, dict, dict]:
    """(adapter_config, {base weight key: {"A", "B"}}, {base bias key: tensor}, {a MoE model's
    fused expert parameter: {"A", "B"}} (merge_adapter/experts.py)). `base_family()`: the
    base model's family record, asked only for an adapter on the experts."""
    config_file, weights = adapter / PEFT_CONFIG_FILE, adapter / PEFT_WEIGHTS_FILE
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
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise UserError(
            f"{adapter}: adapter_config.json sets rank_pattern or alpha_pattern; merge folds "
            "adapters with one rank and alpha (lora.r, lora.alpha) for every weight"
        )
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    biases: dict[str, torch.Tensor] = {}
    tensors = {k.removeprefix(PEFT_PREFIX): v for k, v in load_file(str(weights)).items()}
    experts = split_expert_pairs(config, tensors, base_family)
    for name, tensor in tensors.items():
        key = name
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
    incomplete = [k for k, v in {**pairs, **experts}.items() if set(v) != {"A", "B"}]
    if incomplete:
        raise UserError(f"{adapter}: {incomplete[0]} has lora_A or lora_B missing")
    return config, pairs, biases, experts


def base_record(cfg: RunConfig):
    """The base model's family record (from its config.json)."""
    return family(load_config(cfg.model).model_type)


def check_base(cfg: RunConfig, adapter: Path, config: dict, source: str) -> None:
    """The adapter must have been trained on the recipe's base model."""
    base = BaseModelRecord.read(adapter)
    if base is not None:
        if (base.name_or_path, base.revision) != (cfg.model.name_or_path, cfg.model.revision):
            raise UserError(
                f"{adapter}: trained on {base.name_or_path} (revision "
                f"{base.revision}), but the recipe's model is "
                f"{cfg.model.name_or_path} (revision {cfg.model.revision})"
            )
        if base.commit and cfg.model.commit and base.commit != cfg.model.commit:
            raise UserError(
                f"{adapter}: trained on {base.name_or_path} at commit {base.commit}, but "
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


def merge_shard(shard: Path, target: Path, update) -> list[str]:
    """Stream one safetensors shard to `target`, `update(key, tensor)` giving each tensor's new
    value (or None: unchanged); returns the keys changed.

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
                new = update(key, tensor)
                if new is not None:
                    if new.shape != tensor.shape:
                        raise UserError(
                            f"{key}: the update has shape {tuple(new.shape)}, the base "
                            f"tensor {tuple(tensor.shape)}"
                        )
                    tensor = new.to(tensor.dtype)
                    changed.append(key)
                out.write(tensor.contiguous().view(-1).view(torch.uint8).numpy())
    return changed


def lora_update(pairs: dict, biases: dict, scale: float, fan_in_fan_out: bool, adapter: Path,
                experts: ExpertMerge | None = None):  # fmt: skip
    """merge_shard's update for a LoRA adapter: W + scale * B @ A, trained biases, and the
    experts' pairs (`experts`)."""

    def update(key: str, tensor: torch.Tensor) -> torch.Tensor | None:
        if key in pairs:
            change = delta(pairs[key], scale, fan_in_fan_out)
            if change.shape != tensor.shape:
                raise UserError(
                    f"{adapter}: LoRA update for {key} has shape "
                    f"{tuple(change.shape)}, the base weight {tuple(tensor.shape)}"
                )
            return tensor.float() + change
        if key in biases:
            if biases[key].shape != tensor.shape:
                raise UserError(
                    f"{adapter}: bias {key} has shape {tuple(biases[key].shape)}, "
                    f"the base's {tuple(tensor.shape)}"
                )
            return biases[key]
        return experts.update(key, tensor) if experts is not None else None

    return update


def base_keys(shards: list[Path]) -> set[str]:
    """Every tensor name of the base (headers only: cheap, and a wrong adapter is refused
    before any work)."""
    keys = set()
    for shard in shards:
        with safe_open(str(shard), framework="pt") as f:
            keys.update(f.keys())  # noqa: SIM118 (safe_open is not a dict)
    return keys


def copy_alongside(
    cfg: RunConfig, adapter: Path, base_dir: Path, staging: Path
) -> BaseModelRecord | None:
    """Config files, tokenizer, resolved recipe and the training run's metrics and TensorBoard
    events; returns what the training worker recorded about the base (base_model.json)."""
    for name in COPIED:
        if (base_dir / name).is_file():
            shutil.copy2(base_dir / name, staging / name)
    tokenizer_source = adapter if (adapter / "tokenizer_config.json").is_file() else base_dir
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(str(tokenizer_source)).save_pretrained(staging)
    write_resolved(cfg, staging)
    if (adapter / METRICS_FILE).is_file():  # the training run's metrics travel along
        shutil.copy2(adapter / METRICS_FILE, staging / TRAINING_METRICS_FILE)
    if (adapter / "tensorboard").is_dir():  # and its TensorBoard events
        shutil.copytree(adapter / "tensorboard", staging / "tensorboard")
    return BaseModelRecord.read(adapter)


@dataclass
class Folding:
    """What merging a LLaMA-Adapter (v2) does with each trained tensor (merge_llama_adapter)."""

    scales: dict[str, torch.Tensor]  # linear layer -> its trained scale
    norms: dict[str, torch.Tensor]  # trained norm tensors, by their base names
    prompts: dict[str, torch.Tensor]  # prompts and gates: served unmerged
    residual: dict[str, torch.Tensor]  # everything served unmerged
    scaled: set[str]  # linear layers whose weight takes the scale
    summed: dict[str, torch.Tensor]  # base bias key -> the adapter's bias c

    @classmethod
    def of(cls, cfg: RunConfig, adapter: Path, tensors: dict, keys: set[str]) -> Folding:
        def ending(suffix: str) -> dict[str, torch.Tensor]:
            return {k[: -len(suffix)]: v for k, v in tensors.items() if k.endswith(suffix)}

        scales, biases = ending(".adapter_v2.scale"), ending(".adapter_v2.bias")
        prompts = {k: v for k, v in tensors.items() if ".adapter." in k}
        norms = {k: v for k, v in tensors.items() if k not in prompts and ".adapter_v2." not in k}
        unknown = sorted(set(norms) - keys)
        if unknown:
            raise UserError(
                f"{adapter}: trained tensor {unknown[0]} is not in the base model "
                f"{cfg.model.name_or_path}"
            )
        fold = cls(scales, norms, prompts, dict(prompts), set(), {})
        for layer, scale in scales.items():
            if f"{layer}.weight" not in keys:  # a head tied to the embeddings
                fold.residual[f"{layer}.adapter_v2.scale"] = scale
                fold.residual[f"{layer}.adapter_v2.bias"] = biases[layer]
                continue
            fold.scaled.add(layer)
            if f"{layer}.bias" in keys:
                fold.summed[f"{layer}.bias"] = biases[layer].float()
            else:
                fold.residual[f"{layer}.adapter_v2.bias"] = scale.float() * biases[layer].float()
        return fold


def merge_llama_adapter(cfg: RunConfig, adapter: Path, output: Path, overwrite: bool) -> dict:
    """LLaMA-Adapter (v2): fold what is a function of one weight, keep the rest beside it.

    Adapter v2's scale s and bias c on a linear layer W x + b give s*W x + s*(b + c): s*W
    replaces W and s*(b + c) replaces b where the base has that bias; the trained norms replace
    the base's. What cannot be folded is served unmerged from the output's adapter.safetensors:
    the prompts and gates (attention over extra keys and values, not a weight), s*c where the
    base layer has no bias, and the bias and scale of a head that shares its weights with the
    input embeddings (no head tensor to fold into)."""
    from safetensors.torch import save_file

    from ..methods.llama_adapter import AdapterSpec

    spec = AdapterSpec.read(adapter)
    if spec.merged:
        raise UserError(f"{adapter}: already merged ({ADAPTER_SPEC_FILE} says merged)")
    try:
        tensors = load_file(str(adapter / ADAPTER_WEIGHTS_FILE))
    except (OSError, ValueError) as exc:
        raise UserError(
            f"{adapter / ADAPTER_WEIGHTS_FILE}: cannot read the adapter ({exc})"
        ) from None
    source = model_source(cfg.model)
    check_base(cfg, adapter, {}, source)
    shards = safetensors_files(source, model_revision(cfg.model))
    keys = base_keys(shards)
    fold = Folding.of(cfg, adapter, tensors, keys)
    scales, norms, prompts, residual = fold.scales, fold.norms, fold.prompts, fold.residual
    scaled, summed = fold.scaled, fold.summed

    def update(key: str, tensor: torch.Tensor) -> torch.Tensor | None:
        if key in norms:
            return norms[key]
        layer, _, kind = key.rpartition(".")
        if layer not in scaled or kind not in ("weight", "bias"):
            return None
        scale = scales[layer].float()
        if kind == "weight":
            return tensor.float() * scale[:, None]
        return scale * (tensor.float() + summed[key])

    with staged_output(output, overwrite) as staging:
        for shard in shards:
            merge_shard(shard, staging / shard.name, update)
        trained = copy_alongside(cfg, adapter, shards[0].parent, staging)
        save_file(
            {k: v.contiguous() for k, v in residual.items()},
            str(staging / ADAPTER_WEIGHTS_FILE),
            metadata={"format": "pt"},
        )
        AdapterSpec(spec.method, spec.prompt_length, spec.start_layer, merged=True).write(staging)
        summary = {
            **merge_record(cfg, adapter, trained, len(shards)),
            "folded_scales": len(scaled),
            "folded_biases": len(summed),
            "replaced_norm_tensors": len(norms),
            "unmerged_tensors": len(residual),
            "unmerged_params": sum(v.numel() for v in residual.values()),
            "message": (
                f"method={spec.method}: folded {len(scaled)} linear scales, {len(summed)} "
                f"biases and {len(norms)} norm tensors into the weights; the prompts and gates "
                f"of {len(prompts) // 2} layers (and {len(residual) - len(prompts)} bias/scale "
                f"tensors with no base tensor to fold into) are served unmerged from "
                f"{output / ADAPTER_WEIGHTS_FILE}: evaluate and push load the folder as it is"
            ),
        }
        write_json(staging / MERGE_FILE, summary)
    return summary


def merge_record(
    cfg: RunConfig, adapter: Path, trained: BaseModelRecord | None, shards: int
) -> dict:
    return {
        "base": cfg.model.name_or_path,
        "revision": cfg.model.revision,
        "commit": cfg.model.commit or (trained.commit if trained else None),
        "method": trained.method if trained and trained.method else cfg.method,
        "dataset_fingerprint": trained.dataset_fingerprint if trained else None,
        "adapter": str(adapter),
        "shards": shards,
    }


def merge(
    cfg: RunConfig, adapter_dir: str | Path, output_dir: str | Path, overwrite: bool = False
) -> dict:
    """Write the merged model (shards, index, config, tokenizer) to output_dir; returns a summary
    whose `message` says what was done."""
    adapter, output = Path(adapter_dir), Path(output_dir)
    check_output(output, overwrite)
    if model_folder(adapter).has_prompts:  # LLaMA-Adapter (merged already: refused there)
        return merge_llama_adapter(cfg, adapter, output, overwrite)
    record = functools.cache(lambda: base_record(cfg))  # read once, only when asked
    config, pairs, biases, experts = read_adapter(adapter, record)
    source = model_source(cfg.model)
    check_base(cfg, adapter, config, source)
    scale, fan_in_fan_out = scaling(config), bool(config.get("fan_in_fan_out"))
    shards = safetensors_files(source, model_revision(cfg.model))
    keys = base_keys(shards)
    expert_merge = None
    if experts:
        expert_merge = ExpertMerge(experts, record(), config["r"], scale, adapter)
    missing = sorted((set(pairs) | set(biases)) - keys)
    missing += expert_merge.missing(keys) if expert_merge else []
    packed = [name for name in missing if f"{name}_blocks" in keys]
    if packed:
        raise UserError(
            f"{adapter}: the base model {cfg.model.name_or_path} stores its experts in MXFP4 "
            f"({packed[0]}_blocks), which cannot take a LoRA update in place; merge into a "
            "bf16 copy of the base (its experts dequantized), or evaluate the adapter on its base "
            "(eval.engine=hf)"
        )
    if missing:
        raise UserError(
            f"{adapter}: targets {missing[0]}, which the base model "
            f"{cfg.model.name_or_path} does not have"
        )
    update = lora_update(pairs, biases, scale, fan_in_fan_out, adapter, expert_merge)
    with staged_output(output, overwrite) as staging:
        for shard in shards:
            merge_shard(shard, staging / shard.name, update)
        trained = copy_alongside(cfg, adapter, shards[0].parent, staging)
        summary = {
            **merge_record(cfg, adapter, trained, len(shards)),
            "merged_weights": len(pairs),
            "merged_expert_weights": len(experts),
            "replaced_biases": len(biases),
            "scale": scale,
            "message": f"merged {len(pairs)} weights in {len(shards)} shard(s) (scale "
            f"{scale:g}) into {output}",
        }
        write_json(staging / MERGE_FILE, summary)
    return summary
