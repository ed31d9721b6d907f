"""evaluate on preference data (held-out pairs, documents 2k chosen and 2k + 1 rejected):
each document's answer log-probability on its own, the model's own preference accuracy, and
DPO's implicit reward accuracy of the tuned model with the base as the reference."""

from __future__ import annotations

import torch

from ..artifacts import IGNORE_INDEX


def right_padded(ids: list, labels: list, pad_id: int):
    """(input ids, labels, attention mask) of rows padded on the right to the longest: pads
    are pad_id, labels -100, mask 0."""
    length = max(len(row) for row in ids)
    out = torch.full((len(ids), length), pad_id, dtype=torch.long)
    out_labels = torch.full_like(out, IGNORE_INDEX)
    mask = torch.zeros_like(out)
    for i, (row_ids, row_labels) in enumerate(zip(ids, labels, strict=True)):
        out[i, : len(row_ids)] = torch.as_tensor(row_ids)
        out_labels[i, : len(row_labels)] = torch.as_tensor(row_labels)
        mask[i, : len(row_ids)] = 1
    return out, out_labels, mask


def documents(split) -> list[tuple[list[int], list[int]]]:
    """Every document (example) of a split's rows, in order: (input ids, labels)."""
    docs = []
    for row in split:
        ids, labels, positions = row["input_ids"], row["labels"], row["position_ids"]
        starts = [i for i, p in enumerate(positions) if p == 0] + [len(ids)]
        for a, b in zip(starts[:-1], starts[1:], strict=True):
            docs.append((list(ids[a:b]), list(labels[a:b])))
    return docs


@torch.no_grad()
def answer_logps(model, docs, batch_size: int, pad_id: int) -> tuple[list[float], list[int]]:
    """Each document's summed answer log-probability (its trained labels) and answer tokens,
    every document on its own (no attention across a pair)."""
    device = next(model.parameters()).device
    sums: list[float] = []
    counts: list[int] = []
    for start in range(0, len(docs), batch_size):
        part = docs[start : start + batch_size]
        ids, labels, mask = right_padded([i for i, _ in part], [lab for _, lab in part], pad_id)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        targets = labels[:, 1:].to(device)
        valid = targets != IGNORE_INDEX
        logps = torch.log_softmax(logits[:, :-1].float(), -1)
        picked = logps.gather(2, targets.clamp(min=0)[..., None])[..., 0] * valid
        sums += picked.sum(1).tolist()
        counts += valid.sum(1).tolist()
    return sums, counts


def preference_scores(logps: list[float], counts: list[int]) -> dict:
    """On held-out pairs (documents 2k chosen, 2k + 1 rejected): the chosen answers' mean
    loss per token (`eval_loss`), and `preference_accuracy`, the share of pairs whose chosen
    answer has the higher mean log-probability per token (the model's own preference, no
    reference: comparable between the base and the tuned model)."""
    chosen, rejected = logps[0::2], logps[1::2]
    n_c, n_r = counts[0::2], counts[1::2]
    tokens = sum(n_c)
    better = [
        c / max(a, 1) > r / max(b, 1) for c, r, a, b in zip(chosen, rejected, n_c, n_r, strict=True)
    ]
    return {
        "eval_loss": -sum(chosen) / tokens if tokens else None,
        "eval_tokens": tokens,
        "pairs": len(chosen),
        "preference_accuracy": sum(better) / len(better) if better else None,
    }


def reward_accuracy(tuned: list[float], base: list[float]) -> float | None:
    """DPO's implicit reward with the base as the reference: the share of pairs where the
    tuned model raised the chosen answer's log-probability over the base's more than the
    rejected one's."""
    gains = [t - b for t, b in zip(tuned, base, strict=True)]
    pairs = [c > r for c, r in zip(gains[0::2], gains[1::2], strict=True)]
    return sum(pairs) / len(pairs) if pairs else None
