"""The preference objectives `dpo`, `ipo`, `simpo` and `orpo`: a row holds whole pairs (packed
or one per row), each pair two documents after each other, prompt + chosen answer then prompt
+ rejected answer (prepare_dataset's data.format=preference), so one forward scores both.

Each document's answer log-probability comes from the hidden states in chunks of rows through
the output head (`token_logps`, never a batch x length x vocab logits tensor), only at the
answer's tokens. With `logp` the summed answer log-probability, `avg` its mean per answer
token, c/r the chosen and rejected answer and ref the reference model's:

- dpo: x = beta ((logp_c - ref_c) - (logp_r - ref_r)); loss (1 - e) softplus(-x) + e softplus(x)
  (e = preference.label_smoothing, conservative DPO); rewards beta (logp - ref).
- ipo: ((logp_c - ref_c) / n_c - (logp_r - ref_r) / n_r - 1 / (2 beta))^2 (answer lengths n;
  TRL's length-normalised form); rewards beta (logp - ref).
- simpo: x = beta (avg_c - avg_r) - gamma; loss as dpo's; rewards beta avg.
- orpo: the chosen documents' mean next-token loss (over prompt and answer, as the ORPO
  authors' code in TRL) - lambda log sigmoid(log odds_c - log odds_r) with log odds =
  avg - log(1 - exp(avg)); rewards lambda avg.

The loss is the mean over the micro batch's pairs (TRL's), a MoE model's load-balancing loss
added as sft adds it. Metrics: rewards_chosen, rewards_rejected, reward_accuracy (chosen's
reward above rejected's), reward_margin, logps_chosen, logps_rejected, each a mean over pairs.

The reference (dpo, ipo) is the base with the method's adapters switched off
(`Method.reference`), a frozen copy (`live` for methods without that switch), or log-
probabilities computed once before training (`precomputed`: train/reference.py), which each
row then carries."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .base import Loss, Objective, model_inputs, moe_metrics, routed, with_router_terms

if TYPE_CHECKING:
    import torch

    from ..config import RunConfig

# what a batch of pairs holds beside sft's (collate): not model inputs
PAIR_KEYS = (
    "answer_doc",
    "answer_len",
    "answer_mask",
    "labelled_len",
    "labelled_logps",
    "pairs",
    "ref_logps",
)
METRICS = (
    "rewards_chosen",
    "rewards_rejected",
    "reward_accuracy",
    "reward_margin",
    "logps_chosen",
    "logps_rejected",
)


@dataclass(frozen=True)
class Settings:
    """The parameters one run's objective uses (preference section, defaults filled)."""

    beta: float
    label_smoothing: float = 0.0
    gamma: float = 0.5  # simpo's
    orpo_lambda: float = 0.1


class Preference(Objective):
    """One preference loss over pairs; `needs_reference`: dpo and ipo compare with a reference."""

    columns = ("input_ids", "labels", "position_ids")
    metrics = METRICS
    needs_reference = False
    scores_prompt = False  # the loss also scores the chosen documents' prompt tokens (orpo)
    default_beta = 0.1
    data_format = "preference"

    def __init__(self, settings: Settings | None = None):
        self.settings = settings or Settings(self.default_beta)
        self.precomputed: dict | None = None  # split name -> (flat logps, row offsets)

    def configured(self, cfg: RunConfig) -> Preference:
        """This objective with the recipe's parameters."""
        given = cfg.preference.model_dump(exclude_none=True)  # the rest: Settings' defaults
        return type(self)(Settings(**{"beta": self.default_beta, **given}))

    def validate(self, cfg: RunConfig) -> None:
        p = cfg.preference
        if cfg.data.format != "preference":
            raise ValueError(
                f"train.objective={self.name} trains on pairs: it needs data.format=preference, "
                f"got {cfg.data.format}"
            )
        unused = {
            "beta": p.beta is not None and self.name == "orpo",
            "label_smoothing": p.label_smoothing and self.name not in ("dpo", "simpo"),
            "gamma": p.gamma is not None and self.name != "simpo",
            "orpo_lambda": p.orpo_lambda is not None and self.name != "orpo",
            "reference": cfg.train.reference != "auto" and not self.needs_reference,
        }
        for key, bad in unused.items():
            if bad:
                raise ValueError(
                    f"{'train' if key == 'reference' else 'preference'}.{key} has no meaning for "
                    f"train.objective={self.name}"
                    + ("" if key != "reference" else " (it needs no reference model)")
                )
        if self.needs_reference and reference_mode(cfg) == "live":
            from ..methods import method_of

            method = method_of(cfg)
            if not method.switches_off and cfg.distributed.strategy == "deepspeed":
                raise ValueError(
                    f"train.reference=live with method={cfg.method} needs a frozen copy "
                    "of the model, which kubetune shards under ddp and fsdp but not under "
                    "deepspeed: set train.reference=precomputed"
                )

    def metrics_for(self, model) -> tuple[str, ...]:
        return METRICS + moe_metrics(model)

    # --- batches ---------------------------------------------------------------------------
    def collate(
        self, rows: list[dict], pad_id: int, attn: str, dtype: torch.dtype, pad_to: int = 0
    ) -> dict:
        """sft's padded batch, plus where each answer token's document is: `answer_doc`, the
        document (chosen 2k, rejected 2k + 1 of pair k) of every position whose next token is
        an answer token, in row-major order; `answer_len`, each document's answer tokens; and
        with precomputed reference log-probabilities, `ref_logps` per document."""
        import torch

        from ..train.data import collate, document_starts

        batch = collate(rows, pad_id, attn, dtype, pad_to)
        labels, positions = batch["labels"], batch["position_ids"]
        starts = document_starts(positions, batch["lengths"])  # (rows, length) bool
        doc = torch.cumsum(starts.flatten().long(), 0).view_as(labels) - 1  # global document
        docs = int(starts.sum())
        if docs % 2 or not docs:
            raise ValueError(f"a batch of pairs holds {docs} documents")
        answer = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:] != -100
        if self.scores_prompt:  # the chosen documents' prompt tokens are labelled too
            from ..train.data import real_tokens

            chosen_prompt = (doc % 2 == 0) & ~starts & (labels == -100)
            chosen_prompt &= real_tokens(batch, "cpu").bool()
            batch["labels"] = labels = torch.where(chosen_prompt, batch["input_ids"], labels)
        target = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
        next_doc = torch.nn.functional.pad(doc, (0, 1), value=-1)[:, 1:]
        answer_doc = next_doc[target != -100]
        batch["answer_doc"] = answer_doc
        if self.scores_prompt:  # which of the labelled tokens are the answers'
            batch["answer_mask"] = answer[target != -100]
            batch["labelled_len"] = torch.bincount(answer_doc, minlength=docs)
            answer_doc = answer_doc[batch["answer_mask"]]
        batch["answer_len"] = torch.bincount(answer_doc, minlength=docs)
        batch["pairs"] = docs // 2
        if self.precomputed is not None:
            batch["ref_logps"] = self.precomputed_for(rows)
        return batch

    def precomputed_for(self, rows: list[dict]):
        import torch

        from ..errors import UserError

        parts = []
        for row in rows:
            split, index = row.get("_split", "train"), row.get("_row")
            table = self.precomputed.get(split) if self.precomputed else None
            if table is None or index is None:
                raise UserError(f"no precomputed reference log-probabilities for {split} rows")
            flat, offsets = table
            parts.append(torch.as_tensor(flat[offsets[index] : offsets[index + 1]]))
        return torch.cat(parts).float()

    def weight(self, batch: dict) -> int:
        return int(batch["pairs"])

    # --- the loss ---------------------------------------------------------------------------
    def sequence_logps(self, model, batch: dict, device, attn: str, reference=None):
        """(summed answer log-probability per document, the MoE watch's terms or None); with
        `scores_prompt`, the sums over every labelled token go to batch["labelled_logps"]."""
        import torch

        inputs = model_inputs(batch, device, attn, PAIR_KEYS + ("labels",))
        labels = batch["labels"].to(device, non_blocking=True)
        docs = int(batch["answer_len"].numel())
        answer_doc = batch["answer_doc"].to(device, non_blocking=True)

        def sums(token_logps):
            out = torch.zeros(docs, dtype=torch.float32, device=device)
            if "answer_mask" not in batch:
                return out.index_add(0, answer_doc, token_logps.float())
            batch["labelled_logps"] = out.index_add(0, answer_doc, token_logps.float())
            mask = batch["answer_mask"].to(device, non_blocking=True)
            return torch.zeros_like(out).index_add(0, answer_doc[mask], token_logps[mask].float())

        if reference is not None:
            with torch.no_grad(), reference():
                return sums(reference.model(**inputs, logps_of=labels).logps), None
        token_logps, terms = routed(
            model, batch, device, lambda: model(**inputs, logps_of=labels).logps
        )
        return sums(token_logps), terms

    def loss(self, model, batch: dict, device: torch.device, attn: str, reference=None) -> Loss:
        import torch

        ref = None
        if self.needs_reference:
            if "ref_logps" in batch:
                ref = batch["ref_logps"].to(device)
            elif reference is None:
                raise RuntimeError(f"{self.name}: no reference model and no precomputed logps")
            else:  # first, so its activations are gone before the policy's forward
                ref, _ = self.sequence_logps(model, batch, device, attn, reference)
        logps, moe = self.sequence_logps(model, batch, device, attn)
        lengths = batch["answer_len"].to(device).float()
        value, rewards = self.pair_loss(logps, ref, lengths, batch)
        chosen, rejected = rewards[0::2], rewards[1::2]
        metrics = {
            "rewards_chosen": chosen.mean(),
            "rewards_rejected": rejected.mean(),
            "reward_accuracy": (chosen > rejected).float().mean(),
            "reward_margin": (chosen - rejected).mean(),
            "logps_chosen": logps[0::2].detach().mean(),
            "logps_rejected": logps[1::2].detach().mean(),
        }
        out = with_router_terms(model, Loss(value, metrics), moe)
        return Loss(out.value, {k: v.detach().to(torch.float32) for k, v in out.metrics.items()})

    def pair_loss(self, logps, ref, lengths, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean loss over the pairs, each document's reward, detached)."""
        raise NotImplementedError


def smoothed(x, smoothing: float):
    """-(1 - e) log sigmoid(x) - e log sigmoid(-x)."""
    import torch.nn.functional as F

    return -(1 - smoothing) * F.logsigmoid(x) - smoothing * F.logsigmoid(-x)


class DPO(Preference):
    name = "dpo"
    needs_reference = True

    def pair_loss(self, logps, ref, lengths, batch):
        s = self.settings
        ratios = logps - ref
        x = s.beta * (ratios[0::2] - ratios[1::2])
        return smoothed(x, s.label_smoothing).mean(), s.beta * ratios.detach()


class IPO(Preference):
    name = "ipo"
    needs_reference = True

    def pair_loss(self, logps, ref, lengths, batch):
        s = self.settings
        ratios = logps - ref
        mean = ratios / lengths.clamp(min=1)
        gap = mean[0::2] - mean[1::2] - 1 / (2 * s.beta)
        return (gap**2).mean(), s.beta * ratios.detach()


class SimPO(Preference):
    name = "simpo"
    default_beta = 2.0

    def pair_loss(self, logps, ref, lengths, batch):
        s = self.settings
        mean = logps / lengths.clamp(min=1)
        x = s.beta * (mean[0::2] - mean[1::2]) - s.gamma
        return smoothed(x, s.label_smoothing).mean(), s.beta * mean.detach()


class ORPO(Preference):
    """ORPO as its authors' code in TRL: the next-token loss over the chosen documents' prompt
    and answer, the odds ratio over the answers' mean log-probabilities."""

    name = "orpo"
    scores_prompt = True

    def pair_loss(self, logps, ref, lengths, batch):
        import torch
        import torch.nn.functional as F

        s = self.settings
        mean = logps / lengths.clamp(min=1)
        labelled = batch["labelled_logps"][0::2]
        counted = batch["labelled_len"][0::2].to(labelled.device).sum().clamp(min=1)
        nll = -labelled.sum() / counted
        # log(1 - exp(m)) for m < 0, stable on both sides of -log 2
        log1mexp = torch.where(
            mean > -math.log(2),
            torch.log(-torch.expm1(mean)),
            torch.log1p(-torch.exp(mean)),
        )
        odds = mean - log1mexp
        value = nll - s.orpo_lambda * F.logsigmoid(odds[0::2] - odds[1::2]).mean()
        return value, s.orpo_lambda * mean.detach()


def reference_mode(cfg: RunConfig) -> str | None:
    """How the run gets its reference log-probabilities: live, precomputed, or None (none
    needed). auto: live where the method can switch its adapters off, else precomputed."""
    from . import REGISTRY

    if not REGISTRY[cfg.train.objective].needs_reference:
        return None
    if cfg.train.reference != "auto":
        return cfg.train.reference
    from ..methods import method_of

    return "live" if method_of(cfg).switches_off else "precomputed"
