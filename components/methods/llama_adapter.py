"""LLaMA-Adapter and LLaMA-Adapter v2 on Falcon and the Llama family: our own small module.

peft's AdaptionPrompt covers llama/mistral/gpt2 only, with one gate per layer, and peft has no
Adapter v2; the published Falcon-7B comparison (lit-parrot) gates every head. So one module
implements both methods the way lit-parrot does, for every architecture kubetune trains:

- `method: adapter`: every decoder layer from `adapter.start_layer` up learns
  `adapter.prompt_length` prefix vectors. The layer's own key/value projection turns them into
  keys and values; every query (after RoPE) attends to them without a mask, and that attention's
  output, times a zero-initialised gate per head, is added to the attention output before the
  output projection. At step 0 the model computes exactly what the base model computes.
- `method: adapter_v2`: the same prefix, plus a bias (zeros) and a scale (ones) on every linear
  layer, the output head included, `y = scale * (W x + b + bias)`, and every norm trained.

transformers' module names stay as they are: the prefix and gate live in a child module
`adapter` of each adapted attention module, the bias and scale in a child module `adapter_v2`
of each linear layer, and hooks call them. FSDP, ZeRO-3 (which gathers a module's parameters
when that module runs) and gradient checkpointing (which re-runs the hooks) see ordinary modules.

A trained adapter is `adapter.safetensors` (the trainable tensors by parameter name, norms
under their base names) plus `kubetune_adapter.json`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ..architectures import family, supporting
from ..artifacts import ADAPTER_SPEC_FILE, ADAPTER_WEIGHTS_FILE
from ..errors import UserError

if TYPE_CHECKING:
    from ..config import RunConfig


@dataclass(frozen=True)
class AdapterSpec:
    """What kubetune_adapter.json records: enough to rebuild the modules on a base model."""

    method: str
    prompt_length: int
    start_layer: int
    merged: bool = False  # the linear scales (and foldable biases) are in the weights

    @classmethod
    def from_recipe(cls, cfg: RunConfig) -> AdapterSpec:
        return cls(cfg.method, cfg.adapter.prompt_length, cfg.adapter.start_layer)

    @classmethod
    def read(cls, folder: Path) -> AdapterSpec:
        path = folder / ADAPTER_SPEC_FILE
        try:
            data = json.loads(path.read_text())
            return cls(**data)
        except (OSError, ValueError, TypeError) as exc:
            raise UserError(f"{path}: not a kubetune adapter spec ({exc})") from None

    def write(self, folder: Path) -> None:
        (folder / ADAPTER_SPEC_FILE).write_text(json.dumps(asdict(self), indent=1) + "\n")


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    """The decoder layers' attention modules, bottom to top."""
    from ..architectures import decoder_layers

    found = []
    for layer in decoder_layers(model):
        attn = getattr(layer, "self_attention", None) or getattr(layer, "self_attn", None)
        if attn is None:
            raise UserError(f"method=adapter: no attention module in {type(layer).__name__}")
        found.append(attn)
    return found


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def split_falcon_qkv(
    attn: nn.Module, fused: torch.Tensor, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Falcon's fused query_key_value output (batch, seq, features) as query (batch, seq,
    heads, head_dim), key and value (batch, seq, kv heads, head_dim), in each of its layouts:
    grouped per key-value head (new_decoder_architecture: a group's queries, then its key and
    value), multi-query (every query head, then one key and one value), or interleaved per head
    (query, key, value of head 0, then head 1 ...). Ours, not transformers' private
    _split_heads, which transformers 5.25 removed."""
    shape = fused.shape[:-1]
    heads = fused.view(*shape, -1, head_dim)
    if attn.new_decoder_architecture:
        grouped = heads.view(*shape, attn.num_kv_heads, -1, head_dim)
        return grouped[..., :-2, :].flatten(-3, -2), grouped[..., -2, :], grouped[..., -1, :]
    if attn.multi_query:
        query, key, value = heads.split([attn.num_heads, 1, 1], dim=-2)
        return query, key, value
    query, key, value = heads.unflatten(-2, (attn.num_heads, 3)).unbind(-2)
    return query, key, value


class Prefix(nn.Module):
    """One layer's learned prompt and per-head gate (lit-parrot's adapter_wte, gating_factor)."""

    def __init__(self, length: int, hidden: int, heads: int, head_dim: int, fused: bool, device):
        super().__init__()
        self.prefix = nn.Parameter(torch.empty(length, hidden, device=device))
        self.gate = nn.Parameter(torch.zeros(heads, device=device))
        if self.prefix.device.type != "meta":
            nn.init.normal_(self.prefix)  # lit-gpt: nn.Embedding's N(0, 1)
        self.heads, self.head_dim, self.fused = heads, head_dim, fused
        self.query: torch.Tensor | None = None  # set by the hooks during one forward
        self.rope = None
        self.busy = False  # projecting the prefix: the query hook must not record it
        self.off = False  # the base's attention alone (a preference objective's reference)

    def split(self, attn: nn.Module, projected: torch.Tensor, part: int) -> torch.Tensor:
        """(batch, seq, heads, head_dim) of the query (0), key (1) or value (2); keys and values
        have the attention's key-value heads."""
        if self.fused:  # Falcon's query_key_value, in any of its three layouts
            return split_falcon_qkv(attn, projected, self.head_dim)[part]
        batch, seq, _ = projected.shape
        return projected.view(batch, seq, -1, self.head_dim)

    def prefix_kv(self, attn: nn.Module, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        prompt = self.prefix.to(dtype)[None]
        self.busy = True
        try:
            if self.fused:
                fused = attn.query_key_value(prompt)
                key, value = self.split(attn, fused, 1), self.split(attn, fused, 2)
            else:
                key = self.split(attn, attn.k_proj(prompt), 1)
                value = self.split(attn, attn.v_proj(prompt), 2)
        finally:
            self.busy = False
        return key.transpose(1, 2), value.transpose(1, 2)  # (1, kv heads, length, head_dim)

    def forward(self, attended: torch.Tensor, attn: nn.Module) -> torch.Tensor:
        """attended: the attention output before its projection, (batch, seq, heads*head_dim)."""
        projected, rope = self.query, self.rope
        self.query = self.rope = None
        if self.off:
            return attended
        if projected is None:
            raise RuntimeError("adapter: the query hook did not run before the output projection")
        batch, seq, _ = attended.shape
        query = self.split(attn, projected, 0).transpose(1, 2)
        if rope is not None:  # the queries the attention used: rotary-embedded
            cos, sin = (t.unsqueeze(1) for t in rope)
            query = query * cos + _rotate_half(query) * sin
        key, value = self.prefix_kv(attn, query.dtype)
        repeat = self.heads // key.shape[1]
        if repeat > 1:
            key, value = key.repeat_interleave(repeat, 1), value.repeat_interleave(repeat, 1)
        shape = (batch, self.heads, key.shape[2], self.head_dim)
        out = F.scaled_dot_product_attention(query, key.expand(shape), value.expand(shape))
        gated = self.gate.to(out.dtype).view(1, -1, 1, 1) * out
        return attended + gated.transpose(1, 2).reshape(batch, seq, -1).to(attended.dtype)


class ScaleBias(nn.Module):
    """Adapter v2 on one linear layer: y = scale * (linear(x) + bias)."""

    def __init__(self, features: int, device, with_scale: bool = True):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(features, device=device))
        self.scale = nn.Parameter(torch.ones(features, device=device)) if with_scale else None

    def forward(self, out: torch.Tensor) -> torch.Tensor:
        out = out + self.bias.to(out.dtype)
        return out * self.scale.to(out.dtype) if self.scale is not None else out


def _install_prefix(attn: nn.Module, model_type: str, config, length: int, device) -> None:
    # (module that computes the queries, output projection): the family record's
    query_name, out_name = family(model_type).adapter_attention  # type: ignore[misc]
    heads = config.num_attention_heads
    head_dim = getattr(attn, "head_dim", None) or config.hidden_size // heads
    attn.adapter = Prefix(
        length, config.hidden_size, heads, head_dim, model_type == "falcon", device
    )

    def keep_rope(module, args, kwargs):
        module.adapter.rope = kwargs.get("position_embeddings")

    def keep_query(module, args, out):
        if not attn.adapter.busy:
            attn.adapter.query = out

    def add_prefix(module, args):
        return (attn.adapter(args[0], attn), *args[1:])

    attn.register_forward_pre_hook(keep_rope, with_kwargs=True)
    attn.get_submodule(query_name).register_forward_hook(keep_query)
    attn.get_submodule(out_name).register_forward_pre_hook(add_prefix)


def _install_scale_bias(linear: nn.Linear, device, with_scale: bool = True) -> None:
    linear.adapter_v2 = ScaleBias(linear.out_features, device, with_scale)
    linear.register_forward_hook(lambda module, args, out: module.adapter_v2(out))


ADDED = (".adapter.prefix", ".adapter.gate", ".adapter_v2.bias", ".adapter_v2.scale")


def is_added(name: str) -> bool:
    """A parameter this module adds (no base checkpoint holds it)."""
    return name.endswith(ADDED)


def initial_value(name: str, shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
    """What an added parameter starts as (as Prefix and ScaleBias build them): for a model
    built on the meta device and filled afterwards (low-memory FSDP loading)."""
    if name.endswith(".adapter.prefix"):
        return torch.empty(shape).normal_(0.0, 0.02, generator=generator)
    if name.endswith(".adapter_v2.scale"):
        return torch.ones(shape)
    return torch.zeros(shape)  # gates and biases


def is_norm(module: nn.Module) -> bool:
    return "norm" in type(module).__name__.lower()


def check_architecture(method: str, config, start_layer: int) -> None:
    """The method runs on this architecture and adapter.start_layer names one of its layers."""
    if family(config.model_type).adapter_attention is None:
        raise UserError(
            f"method={method}: kubetune implements it for {', '.join(supporting(lambda r: r.adapter_attention))}, "
            f"not model type {config.model_type!r}"
        )
    if config.model_type == "falcon" and getattr(config, "alibi", False):
        raise UserError(f"method={method}: Falcon with ALiBi positions is not supported")
    layers = config.num_hidden_layers
    if not 0 <= start_layer < layers:
        raise UserError(
            f"adapter.start_layer={start_layer}: the model has {layers} decoder layers "
            "(0-based; at least one must carry a prompt)"
        )


def install(
    model: nn.Module, spec: AdapterSpec, residual: dict[str, bool] | None = None
) -> list[str]:
    """Add the spec's modules to a causal LM (any device, meta included); freeze everything
    else. `residual`, for a merged model: {linear layer: whether it kept its scale} for the
    layers whose bias (and scale) merge could not fold. Returns the trainable parameters' names."""
    config = model.config
    model_type = config.model_type
    check_architecture(spec.method, config, spec.start_layer)
    layers = _attention_modules(model)
    model.requires_grad_(False)
    for attn in layers[spec.start_layer :]:  # each on its layer's device (device_map=auto)
        device = next(attn.parameters()).device
        _install_prefix(attn, model_type, config, spec.prompt_length, device)
    if spec.method == "adapter_v2":
        linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
        for name, linear in linears:
            device = linear.weight.device
            if not spec.merged:
                _install_scale_bias(linear, device)
            elif residual and name in residual:
                _install_scale_bias(linear, device, with_scale=residual[name])
        if not spec.merged:  # a merged model has its trained norms in the weights
            for module in model.modules():
                if is_norm(module):
                    module.requires_grad_(True)
    return [n for n, p in model.named_parameters() if p.requires_grad]


def trainable_count(model: nn.Module) -> int:
    return sum({id(p): p.numel() for p in model.parameters() if p.requires_grad}.values())


def save(folder: Path, spec: AdapterSpec, state: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    save_file(tensors, str(folder / ADAPTER_WEIGHTS_FILE), metadata={"format": "pt"})
    spec.write(folder)


def load_into(model: nn.Module, folder: Path) -> AdapterSpec:
    """Install a saved adapter on a loaded base (or merged) model, for evaluation."""
    from safetensors.torch import load_file

    spec = AdapterSpec.read(folder)
    tensors = load_file(str(folder / ADAPTER_WEIGHTS_FILE))
    suffix = ".adapter_v2.bias"
    residual = {
        k[: -len(suffix)]: f"{k[: -len(suffix)]}.adapter_v2.scale" in tensors
        for k in tensors
        if k.endswith(suffix)
    }
    install(model, spec, residual)
    params = dict(model.named_parameters())
    unknown = sorted(set(tensors) - set(params))
    if unknown:
        raise UserError(
            f"{folder / ADAPTER_WEIGHTS_FILE}: {unknown[0]} is not a parameter of the model"
        )
    trained = {n for n, p in params.items() if p.requires_grad}
    missing = sorted(trained - set(tensors))
    if missing:
        raise UserError(f"{folder / ADAPTER_WEIGHTS_FILE}: no tensor for {missing[0]}")
    with torch.no_grad():
        for name, tensor in tensors.items():
            if params[name].shape != tensor.shape:
                raise UserError(
                    f"{folder / ADAPTER_WEIGHTS_FILE}: {name} has shape {tuple(tensor.shape)}, "
                    f"the model's is {tuple(params[name].shape)}"
                )
            params[name].copy_(tensor)
    model.requires_grad_(False)
    return spec
