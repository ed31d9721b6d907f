"""The one place that chooses the training kernels, and the loss that never builds full logits.

`train.kernels`:
- `auto`: Liger-Kernel's RMSNorm, RoPE, SwiGLU and fused linear cross-entropy where it is
  installed, the device is CUDA and the architecture is one Liger patches (Llama, Mistral,
  Qwen2); everywhere else (Falcon, CPU, Liger missing) kubetune's chunked linear +
  cross-entropy over the output head.
- `liger`: Liger's kernels, or a clear error saying why they cannot run.
- `none`: transformers' own forward (full logits, upcast to fp32): the reference.

LoRA layers get the fused forward (`fused_lora.py`) under ddp and fsdp (`lora: fused`), peft's
own under DeepSpeed. `train.compile: auto` compiles the decoder layers on CUDA under ddp or
fsdp when the rows are packed (the worker then pads every batch to one length: static shapes,
one compile); a layer that fails to compile falls back to eager with one log line.

What ran is written to metrics.json (`kernels`), so a run says what it actually used.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from types import MethodType
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers.utils import ModelOutput

from ..artifacts import IGNORE_INDEX
from ..errors import UserError
from ..planner.kernel_choice import Kernels, chunk_rows

if TYPE_CHECKING:
    pass


def apply_kernels(model: nn.Module, kernels: Kernels) -> None:
    """Patch the (unwrapped, not yet LoRA-wrapped) causal LM in place."""
    if kernels.liger_modules:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance

        _apply_liger_kernel_to_instance(
            model=model,
            rope=True,
            rms_norm=True,
            swiglu=True,
            cross_entropy=False,
            fused_linear_cross_entropy=kernels.loss == "liger_fused_linear_ce",
        )
    if kernels.loss == "chunked_linear_ce":
        use_chunked_loss(model)


# --- the chunked linear + cross-entropy ------------------------------------------------------


def _chunked_ce(hidden, weight, labels, chunk: int, want_h: bool, want_w: bool):
    """(mean loss, d loss/d hidden or None, d loss/d weight or None), one chunk of rows at a
    time: only one chunk's logits (in fp32) exist at once."""
    valid = labels != IGNORE_INDEX
    count = valid.sum().clamp(min=1).to(torch.float32)
    grad_h = torch.empty_like(hidden) if want_h else None
    grad_w = torch.zeros_like(weight, dtype=torch.float32) if want_w else None
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk):
        h = hidden[start : start + chunk].to(weight.dtype)
        y, ok = labels[start : start + chunk].clamp(min=0), valid[start : start + chunk]
        logits = (h @ weight.t()).float()
        lse = torch.logsumexp(logits, dim=-1)
        total += ((lse - logits.gather(1, y[:, None])[:, 0]) * ok).sum()
        if not (want_h or want_w):
            continue
        probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
        probs[torch.arange(h.shape[0], device=h.device), y] -= 1.0
        g = probs.mul_((ok / count)[:, None]).to(weight.dtype)
        if grad_h is not None:
            grad_h[start : start + chunk] = g @ weight
        if want_w:
            grad_w += (g.t() @ h).float()
    return total / count, grad_h, grad_w


class _LinearCrossEntropy(torch.autograd.Function):
    """Gradients are computed in the forward pass (the chunk's logits exist only there),
    saved, and scaled by the incoming gradient in backward (Liger's scheme)."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk: int):
        loss, grad_h, grad_w = _chunked_ce(
            hidden, weight, labels, chunk, ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        )
        ctx.weight_dtype = weight.dtype
        ctx.save_for_backward(grad_h, grad_w)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_output.to(grad_h.dtype) if grad_h is not None else None
        gw = (grad_w * grad_output).to(ctx.weight_dtype) if grad_w is not None else None
        return gh, gw, None, None


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int | None = None
) -> torch.Tensor:
    """Causal-LM loss of `hidden` (B, L, H) through the output head `weight` (V, H) against
    `labels` (B, L), shifted by one as transformers does, without materialising B x L x V."""
    shifted = nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:].reshape(-1)
    flat = hidden.reshape(-1, hidden.shape[-1])
    chunk = chunk or chunk_rows(flat.shape[0], weight.shape[1], weight.shape[0])
    if not torch.is_grad_enabled():  # evaluation: the loss alone
        return _chunked_ce(flat, weight, shifted, chunk, False, False)[0]
    return _LinearCrossEntropy.apply(flat, weight, shifted, chunk)


def output_head(model: nn.Module):
    """(the model's output head weight, the context inside which it is whole): a DeepSpeed
    ZeRO-3 partition of the (frozen) head is gathered there; a tied head may be gathered
    already."""
    weight = model.get_output_embeddings().weight
    if hasattr(weight, "ds_id"):
        import deepspeed
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        if weight.ds_status != ZeroParamStatus.AVAILABLE:
            return weight, deepspeed.zero.GatheredParameters([weight])
    return weight, nullcontext()


def _chunked_loss_forward(self, input_ids=None, labels=None, **kwargs):
    """The causal LM's forward with the loss computed chunk by chunk over the output head.
    Without labels (generation) it is the model's own forward."""
    if labels is None:
        return type(self).forward(self, input_ids=input_ids, **kwargs)
    from transformers.modeling_outputs import CausalLMOutputWithPast

    kwargs.pop("logits_to_keep", None)
    kwargs.pop("num_items_in_batch", None)
    body = getattr(self, self.base_model_prefix)
    outputs = body(input_ids=input_ids, **kwargs)
    weight, gather = output_head(self)
    with gather:
        loss = linear_cross_entropy(outputs[0], weight, labels)
    return CausalLMOutputWithPast(loss=loss, logits=None)


# --- answer-token log-probabilities (the preference objectives) -----------------------------


def _logps_chunks(hidden, weight, targets, chunk: int, want_h: bool):
    """(log p(target) per row in fp32, d logp/d hidden per row or None), a chunk of rows at a
    time. d logp_i / d h_i = W[y_i] - softmax_i @ W, one hidden-sized row per token."""
    logps = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    grad_h = torch.empty_like(hidden) if want_h else None
    for start in range(0, hidden.shape[0], chunk):
        h = hidden[start : start + chunk].to(weight.dtype)
        y = targets[start : start + chunk]
        logits = (h @ weight.t()).float()
        lse = torch.logsumexp(logits, dim=-1)
        logps[start : start + chunk] = logits.gather(1, y[:, None])[:, 0] - lse
        if grad_h is not None:
            probs = logits.sub_(lse[:, None]).exp_().to(weight.dtype)
            grad_h[start : start + chunk] = weight[y] - probs @ weight
    return logps, grad_h


@dataclass
class TokenLogps(ModelOutput):
    """What the forward returns with `logps_of`: each answer token's log-probability (fp32)."""

    logps: torch.Tensor | None = None


class _TokenLogps(torch.autograd.Function):
    """The hidden states' gradient rows are computed in the forward (where the chunk's logits
    exist) and scaled by each token's incoming gradient in backward; a trained head's
    gradient recomputes the chunk's logits in backward (method=full)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk: int):
        logps, grad_h = _logps_chunks(hidden, weight, targets, chunk, ctx.needs_input_grad[0])
        ctx.chunk = chunk
        ctx.save_for_backward(grad_h, hidden if ctx.needs_input_grad[1] else None, weight, targets)
        return logps

    @staticmethod
    def backward(ctx, grad_output):
        grad_h, hidden, weight, targets = ctx.saved_tensors
        gh = grad_h * grad_output[:, None].to(grad_h.dtype) if grad_h is not None else None
        gw = None
        if hidden is not None:
            gw = torch.zeros_like(weight, dtype=torch.float32)
            for start in range(0, hidden.shape[0], ctx.chunk):
                h = hidden[start : start + ctx.chunk].to(weight.dtype)
                y, g = targets[start : start + ctx.chunk], grad_output[start : start + ctx.chunk]
                logits = (h @ weight.t()).float()
                probs = logits.sub_(torch.logsumexp(logits, -1)[:, None]).exp_()
                probs.neg_()[torch.arange(h.shape[0], device=h.device), y] += 1.0
                gw += (probs.mul_(g[:, None].float()).to(weight.dtype).t() @ h).float()
            gw = gw.to(weight.dtype)
        return gh, gw, None, None


def answer_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(flat indices of the positions whose next token is a label, those labels): labels shift
    by one as in transformers' loss, row-major order."""
    shifted = nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:].reshape(-1)
    index = (shifted != IGNORE_INDEX).nonzero()[:, 0]
    return index, shifted[index]


def token_logps(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int | None = None
) -> torch.Tensor:
    """log p(label) of every answer token (labels not -100, shifted by one), in row-major
    order, from `hidden` (B, L, H) through the bias-free head `weight` (V, H): only the answer
    positions' rows go through the head, a chunk at a time (no B x L x V logits)."""
    index, targets = answer_positions(labels)
    rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, index)
    chunk = chunk or chunk_rows(max(rows.shape[0], 1), weight.shape[1], weight.shape[0])
    if not torch.is_grad_enabled():
        return _logps_chunks(rows, weight, targets, chunk, False)[0]
    return _TokenLogps.apply(rows, weight, targets, chunk)


def _logps_forward(self, input_ids=None, logps_of=None, **kwargs):
    """The causal LM's forward; with `logps_of` (labels) it returns `TokenLogps`: the log-
    probability of each answer token (`token_logps`), chunked through the head when the
    model allows (`chunked_loss_supported`), else from the model's own logits."""
    if logps_of is None:
        return self._kubetune_forward(input_ids=input_ids, **kwargs)
    kwargs.pop("logits_to_keep", None)
    kwargs["use_cache"] = False
    if not self._kubetune_chunked_logps:
        logits = type(self).forward(self, input_ids=input_ids, **kwargs).logits
        index, targets = answer_positions(logps_of)
        rows = logits.reshape(-1, logits.shape[-1]).index_select(0, index).float()
        return TokenLogps(logps=rows.log_softmax(-1).gather(1, targets[:, None])[:, 0])
    body = getattr(self, self.base_model_prefix)
    hidden = body(input_ids=input_ids, **kwargs)[0]
    weight, gather = output_head(self)
    with gather:
        return TokenLogps(logps=token_logps(hidden, weight, logps_of))


def use_token_logps(model: nn.Module, chunked: bool) -> None:
    """Let the model's forward return answer-token log-probabilities (`logps_of=labels`):
    through the head in chunks where `chunked` and the model allows, else from its logits."""
    model._kubetune_forward = model.forward  # what runs without logps_of (kernels' own)
    model._kubetune_chunked_logps = chunked and chunked_loss_supported(model) is None
    model.forward = MethodType(_logps_forward, model)


def chunked_loss_supported(model: nn.Module) -> str | None:
    """None when the model is decoder -> bias-free linear head with no logit post-processing;
    else why not."""
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear) or head.bias is not None:
        return "its output head is not a bias-free linear layer"
    config = model.config
    for attr in ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier"):
        if getattr(config, attr, None) not in (None, 1, 1.0):
            return f"its config sets {attr}"
    if not hasattr(model, getattr(model, "base_model_prefix", "") or "-"):
        return "it has no decoder under base_model_prefix"
    return None


def use_chunked_loss(model: nn.Module) -> None:
    why_not = chunked_loss_supported(model)
    if why_not is not None:
        raise UserError(
            f"train.kernels: the chunked loss cannot run on {model.config.model_type}: {why_not}; "
            "set train.kernels=none"
        )
    model.forward = MethodType(_chunked_loss_forward, model)


def first_cause(exc: BaseException) -> str:
    """`Type: message` of the error at the bottom of a chain (Dynamo wraps a backend's own)."""
    root = exc
    while (inner := getattr(root, "inner_exception", None) or root.__cause__) is not None:
        root = inner
    lines = str(root).strip().splitlines() or [""]
    return f"{type(root).__name__}: {lines[0][:200]}"


def compile_layers(
    layers: list[nn.Module], backend: str | Callable = "inductor", log: Callable | None = None
) -> None:
    """train.compile: torch.compile each decoder layer in place (the unit FSDP shards too).

    Until a layer's compiled call has once succeeded, a failure to compile it (a Dynamo or
    Inductor error) switches every layer back to eager for the rest of the run, with one log
    line; the failed call is then run eagerly. (An Inductor failure that only surfaces when
    the backward graph is first compiled is not caught here: it fails the step.)"""
    failed: list[str] = []
    log = log or (lambda message: print(message, flush=True))

    for layer in layers:
        eager = layer._call_impl
        compiled = torch.compile(eager, backend=backend)
        state = {"ok": False}

        def call(*args, _compiled=compiled, _eager=eager, _state=state, **kwargs):
            if failed:
                return _eager(*args, **kwargs)
            if _state["ok"]:
                return _compiled(*args, **kwargs)
            try:
                out = _compiled(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 (any compile failure: eager instead)
                failed.append(first_cause(exc))
                message = (
                    f"train.compile: compiling the decoder layers failed ({failed[0]}); "
                    "they run eagerly"
                )
                log(message)
                return _eager(*args, **kwargs)
            _state["ok"] = True
            return out

        layer._compiled_call_impl = call
