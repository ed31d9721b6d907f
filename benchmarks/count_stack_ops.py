"""Count the aten ops another training stack's decoder layer dispatches (forward, backward), as
tests/test_speed.py counts transformers' layers for the speed model's LAYER_OPS: the difference
between a 4-layer and a 2-layer model of the same tiny shape, under a TorchDispatchMode.

    python benchmarks/count_stack_ops.py --litgpt-wheel litgpt-0.5.13-py3-none-any.whl

litgpt is no dependency of kubetune: the wheel (`pip download litgpt --no-deps`) is unpacked in
a temporary folder and only its model, config and LoRA modules are imported (its conversion
and training helpers, which need lightning, are replaced by empty modules). Prints one JSON
line per family: the base layer with every weight trainable (as LAYER_OPS is counted) and
frozen, and LoRA on query and value (ops per adapted projection), which speed.py's STACK_OPS
and STACK_LORA_OPS hold.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--litgpt-wheel", type=Path, required=True)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        with zipfile.ZipFile(args.litgpt_wheel) as wheel:
            wheel.extractall(tmp)
        (Path(tmp) / "litgpt" / "__init__.py").write_text("")
        for name, attrs in (
            ("litgpt.scripts", {}),
            ("litgpt.scripts.convert_hf_checkpoint", {"qkv_reassemble": None}),
            ("litgpt.utils", {"map_old_state_dict_weights": None}),
        ):
            module = types.ModuleType(name)
            module.__dict__.update(attrs)
            sys.modules[name] = module
        sys.path.insert(0, tmp)
        import litgpt.lora as lora
        import litgpt.model as model
        from litgpt.config import Config

        version = args.litgpt_wheel.name.split("-")[1]
        for family, name in (("llama", "Llama-2-7b-hf"), ("falcon", "falcon-7b")):
            shape = {"n_embd": 64, "n_head": 4, "padded_vocab_size": 128, "block_size": 64}
            shape.update(
                {"n_query_groups": 4, "intermediate_size": 172}
                if family == "llama"
                else {"n_query_groups": 1}
            )

            def base(layers, frozen=False, name=name, shape=shape):
                net = model.GPT(Config.from_name(name, n_layer=layers, **shape))
                if frozen:  # a frozen base under an adapter: only the input gradients
                    for p in net.parameters():
                        p.requires_grad_(False)
                    net.transformer.wte.weight.requires_grad_(True)
                return net

            def adapted(layers, name=name, shape=shape):
                config = lora.Config.from_name(
                    name, n_layer=layers, lora_r=8, lora_alpha=16, lora_dropout=0.05,
                    lora_query=True, lora_value=True, **shape,
                )  # fmt: skip
                net = lora.GPT(config)
                lora.mark_only_lora_as_trainable(net)
                return net

            trainable = per_layer(base)
            frozen = per_layer(lambda n: base(n, frozen=True))
            with_lora = per_layer(adapted)
            per_adapted = tuple((w - f) / 2 for w, f in zip(with_lora, frozen, strict=True))
            print(
                json.dumps(
                    {
                        "stack": f"litgpt {version}",
                        "family": family,
                        "layer_ops_trainable": trainable,
                        "layer_ops_frozen": frozen,
                        "lora_ops_per_adapted": per_adapted,
                        "torch": torch.__version__,
                    }
                )
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
