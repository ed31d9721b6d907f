"""Mixture-of-experts training terms: the router's load-balancing loss and the experts' load.

`RouterWatch` hooks every router of a MoE model (the module its family record names:
`mlp.gate`, `mlp.router`) and keeps the router logits of one training forward. From them
`terms(mask)` computes, over the real tokens of the batch (`mask`: pads left out):
- the load-balancing loss of Switch Transformers / Mixtral, as transformers'
  `load_balancing_loss_func` computes it (every layer's logits together; experts x the sum over
  experts of the share of top-k picks times the mean router probability), which the objective
  adds to its loss with the model's `router_aux_loss_coef`;
- the experts' load: the busiest and the idlest expert's share of the top-k picks over all
  layers, relative to an even share (1.0 each when routing is balanced; a collapsed router
  shows a large max and a min near 0);
- every expert's token count, per MoE layer, summed over the run's training forwards
  (`tokens`; metrics.json's `expert_tokens`, summed over ranks), where a collapsed layer shows
  which experts starve.

Only a forward the objective opens (`with watch.recording():`) is kept: activation
checkpointing re-runs the forward inside backward, and the evaluation loop runs its own.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

ATTRIBUTE = "_kubetune_router_watch"
FOUND = "_kubetune_router_watch_found"  # watch_of's answer, kept on the model it was asked of


class RouterWatch:
    def __init__(self, routers: list[nn.Module], experts: int, top_k: int, coef: float):
        self.experts, self.top_k, self.coef = experts, top_k, coef
        self.logits: list[torch.Tensor] = []
        self.open = False
        self.tokens: torch.Tensor | None = None  # layers x experts, this rank's picks so far
        for router in routers:
            router.register_forward_hook(self._keep)

    def _keep(self, _module, _inputs, output) -> None:
        if self.open:
            self.logits.append(output[0] if isinstance(output, tuple) else output)

    @contextmanager
    def recording(self):
        self.logits, self.open = [], True
        try:
            yield self
        finally:
            self.open = False

    def terms(self, mask: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(load-balancing loss, the experts' load) of the recorded forward; `mask`: 1.0 for
        each real token, in the routers' (batch x sequence) row order."""
        mask = mask.reshape(-1).float()
        empty = torch.zeros(self.experts, dtype=torch.float32, device=mask.device)
        probs = empty
        per_layer = []  # each layer's top-k picks per expert, over the real tokens
        for logits in self.logits:
            weights = torch.softmax(logits.float(), dim=-1)
            _, chosen = torch.topk(weights, self.top_k, dim=-1)
            per_layer.append(
                empty.scatter_add(0, chosen.reshape(-1), mask.repeat_interleave(self.top_k))
            )
            probs = probs + (weights * mask.unsqueeze(-1)).sum(dim=0)
        rows = mask.sum() * len(self.logits)
        self.logits = []
        counted = torch.stack(per_layer) if per_layer else empty[None]
        picks = counted.sum(dim=0)
        if per_layer:
            self.tokens = counted if self.tokens is None else self.tokens + counted
        aux = torch.sum((picks / rows) * (probs / rows)) * self.experts
        even = picks.sum() / self.experts
        load = {"expert_load_max": picks.max() / even, "expert_load_min": picks.min() / even}
        return aux, load


def expert_tokens(model: nn.Module, world) -> list[list[int]] | None:
    """Every expert's token count per MoE layer over the run, summed over the ranks (None for
    a dense model). Every rank calls it (an all-reduce)."""
    import torch.distributed as dist

    watch = watch_of(model)
    if watch is None:
        return None
    tokens = watch.tokens
    if tokens is None:
        tokens = torch.zeros(0, watch.experts, device=world.device)
    layers = torch.tensor([tokens.shape[0]], device=tokens.device)
    dist.all_reduce(layers, op=dist.ReduceOp.MAX)
    if tokens.shape[0] < int(layers):  # a rank that ran no training forward (resumed at the end)
        tokens = torch.zeros(int(layers), watch.experts, device=tokens.device)
    dist.all_reduce(tokens)
    return [[round(float(v)) for v in row] for row in tokens.tolist()]


def install(model: nn.Module) -> RouterWatch | None:
    """Hook the routers of a MoE model (None for a dense one, or a family without a router
    record): the watch lives on the model, for the objective to find."""
    from ..architectures import family

    config = model.config
    record = family(config.model_type)
    experts = getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None)
    top_k = getattr(config, "num_experts_per_tok", None)
    if record.router is None or not experts or not top_k:
        return None
    routers = [m for name, m in model.named_modules() if name.endswith(record.router)]
    if not routers:
        return None
    coef = float(getattr(config, "router_aux_loss_coef", 0.0) or 0.0)
    watch = RouterWatch(routers, experts, top_k, coef)
    setattr(model, ATTRIBUTE, watch)
    return watch


def watch_of(model: nn.Module) -> RouterWatch | None:
    """The model's RouterWatch, through any wrapper (DDP, FSDP, peft). The objective asks at
    every micro batch: the walk over the modules is done once per model, after `install`."""
    if FOUND in model.__dict__:
        return model.__dict__[FOUND]
    found = next(
        (w for m in model.modules() if (w := getattr(m, ATTRIBUTE, None)) is not None), None
    )
    model.__dict__[FOUND] = found
    return found
