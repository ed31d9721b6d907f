"""Count the aten ops another training stack's decoder layer dispatches (forward, backward), as
tests/test_speed.py counts transformers' layers for the speed model's LAYER_OPS: the difference
between a 4-layer and a 2-layer model of the same tiny shape, under a TorchDispatchMode.

    python benchmarks/count_stack_ops.py --litgpt-wheel litgpt-0.5.13-py3-none-any.whl
    git -C litgpt archive 8641822 lit_gpt | tar -x -C lit-gpt-8641822
    python benchmarks/count_stack_ops.py --lit-gpt-source lit-gpt-8641822

litgpt is no dependency of kubetune: the wheel (`pip download litgpt --no-deps`) or lit-gpt's
2023 package folder (`lit_gpt`, from a clone of Lightning-AI/litgpt at the commit that ran) is
copied to a temporary folder and only its model, config, LoRA and adapter modules are imported
(its conversion, training and lightning helpers are replaced by small modules). Prints one JSON
line per family: the base layer with every weight trainable (as LAYER_OPS is counted) and
frozen, LoRA on query and value (ops per adapted projection), which speed.py's stacks.py tables
hold; for lit-gpt also its LLaMA-Adapter v1 and v2 per layer over the frozen layer's, and the
host time of its LoRA's index list (torch.tensor of a Python list, seconds per int).
"""

from __future__ import annotations

import argparse
import importlib
import json
import shutil
import sys
import tempfile
import timeit
import types
import zipfile
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class Count(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def forward_backward(net, ids) -> tuple[int, int]:
    mode = Count()
    with mode:
        logits = net(ids)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten())
    forward = mode.n
    with mode:
        loss.backward()
    return forward, mode.n - forward


def per_layer(build) -> tuple[float, float]:
    counts = []
    for layers in (2, 4):
        torch.manual_seed(0)
        counts.append(forward_backward(build(layers), torch.randint(0, 100, (2, 32))))
    (f2, b2), (f4, b4) = counts
    return (f4 - f2) / 2, (b4 - b2) / 2


def stub_modules(modules: dict[str, dict]) -> None:
    """Empty stand-ins for the stack's modules that need lightning (never called here)."""
    for name, attrs in modules.items():
        module = types.ModuleType(name)
        module.__dict__.update(attrs)
        sys.modules[name] = module


def find_multiple(n: int, k: int) -> int:  # lit_gpt.utils' (its config pads the vocabulary)
    return n if n % k == 0 else n + k - n % k


class NoRequirement:  # lightning_utilities' RequirementCache: flash-attn is not installed
    def __init__(self, *args) -> None:
        pass

    def __bool__(self) -> bool:
        return False


def load_stack(args, tmp: str):
    """(model module, LoRA module, adapter modules or None, stack name, LoRA config keys)."""
    if args.litgpt_wheel:
        with zipfile.ZipFile(args.litgpt_wheel) as wheel:
            wheel.extractall(tmp)
        (Path(tmp) / "litgpt" / "__init__.py").write_text("")
        stub_modules(
            {
                "litgpt.scripts": {},
                "litgpt.scripts.convert_hf_checkpoint": {"qkv_reassemble": None},
                "litgpt.utils": {"map_old_state_dict_weights": None},
            }
        )
        sys.path.insert(0, tmp)
        import litgpt.lora as lora
        import litgpt.model as model

        keys = ("lora_r", "lora_alpha", "lora_dropout", "lora_query", "lora_value")
        return model, lora, None, f"litgpt {args.litgpt_wheel.name.split('-')[1]}", keys
    shutil.copytree(args.lit_gpt_source / "lit_gpt", Path(tmp) / "lit_gpt")
    (Path(tmp) / "lit_gpt" / "__init__.py").write_text("")
    stub_modules(
        {
            "lit_gpt.utils": {
                "find_multiple": find_multiple,
                "map_old_state_dict_weights": lambda state, *args: state,
            },
            "lightning_utilities": {},
            "lightning_utilities.core": {},
            "lightning_utilities.core.imports": {"RequirementCache": NoRequirement},
        }
    )
    sys.path.insert(0, tmp)
    # the model first: lit_gpt.config imports it, and it imports lit_gpt.config's Config
    model, adapter, adapter_v2, lora = (
        importlib.import_module(f"lit_gpt.{name}")
        for name in ("model", "adapter", "adapter_v2", "lora")
    )
    keys = ("r", "alpha", "dropout", "to_query", "to_value")
    return model, lora, {"adapter": adapter, "adapter_v2": adapter_v2}, "lit-gpt", keys


def index_list_seconds() -> float:
    """Host seconds per int of lit-gpt's LoRA index list (Llama-2-7B's query and value
    features), as torch.tensor converts it in every forward (the best of five timings)."""
    ints = list(range(8192))
    best = min(timeit.repeat(lambda: torch.tensor(ints), number=200, repeat=5)) / 200
    return best / len(ints)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--litgpt-wheel", type=Path)
    source.add_argument("--lit-gpt-source", type=Path, help="a folder holding lit_gpt/")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model, lora, adapters, stack, keys = load_stack(args, tmp)
        for family, name in (("llama", "Llama-2-7b-hf"), ("falcon", "falcon-7b")):
            shape = {"n_embd": 64, "n_head": 4, "padded_vocab_size": 128, "block_size": 64}
            shape.update(
                {"n_query_groups": 4, "intermediate_size": 172}
                if family == "llama"
                else {"n_query_groups": 1}
            )

            def base(layers, frozen=False, name=name, shape=shape):
                net = model.GPT(model.Config.from_name(name, n_layer=layers, **shape))
                if frozen:  # a frozen base under an adapter: only the input gradients
                    for p in net.parameters():
                        p.requires_grad_(False)
                    net.transformer.wte.weight.requires_grad_(True)
                return net

            def adapted(layers, name=name, shape=shape):
                lora_args = dict(zip(keys, (8, 16, 0.05, True, True), strict=True))
                net = lora.GPT(lora.Config.from_name(name, n_layer=layers, **lora_args, **shape))
                lora.mark_only_lora_as_trainable(net)
                return net

            def prompted(layers, module, name=name, shape=shape):
                config = module.Config.from_name(
                    name, n_layer=layers, adapter_prompt_length=10, adapter_start_layer=0, **shape
                )
                net = module.GPT(config)
                for key, value in net.named_parameters():  # lit-gpt's mark_only_adapter*
                    value.requires_grad_(module.adapter_filter(key, value))
                return net

            frozen = per_layer(lambda n: base(n, frozen=True))
            record = {
                "stack": stack,
                "family": family,
                "layer_ops_trainable": per_layer(base),
                "layer_ops_frozen": frozen,
                "lora_ops_per_adapted": tuple(
                    (w - f) / 2 for w, f in zip(per_layer(adapted), frozen, strict=True)
                ),
            }
            for method, module in (adapters or {}).items():
                counted = per_layer(lambda n, module=module: prompted(n, module))
                record[f"{method}_ops_per_layer"] = tuple(
                    w - f for w, f in zip(counted, frozen, strict=True)
                )
            if adapters:
                record["index_list_seconds_per_int"] = index_list_seconds()
            print(json.dumps({**record, "torch": torch.__version__}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
