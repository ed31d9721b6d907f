"""Text scores of generated answers against references: ROUGE-1/2/L and exact match.

ROUGE follows Google's `rouge_score` (the package the summarisation papers report) with its
default tokenizer and no stemming: lower-case, every run of characters other than a-z0-9 is a
separator; ROUGE-N is clipped n-gram overlap, ROUGE-L the longest common subsequence; each is
the F-measure of precision and recall, averaged over examples. tests/test_evaluate.py checks
these numbers against `rouge_score` itself.
"""

from __future__ import annotations

import re
import string
from collections import Counter

_NON_ALNUM = re.compile(r"[^a-z0-9]+")


def rouge_tokens(text: str) -> list[str]:
    return _NON_ALNUM.sub(" ", text.lower()).split()


def _f(overlap: int, predicted: int, target: int) -> float:
    precision, recall = overlap / max(predicted, 1), overlap / max(target, 1)
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0


def rouge_n(prediction: list[str], target: list[str], n: int) -> float:
    pred = Counter(tuple(prediction[i : i + n]) for i in range(len(prediction) - n + 1))
    ref = Counter(tuple(target[i : i + n]) for i in range(len(target) - n + 1))
    overlap = sum(min(count, ref[gram]) for gram, count in pred.items())
    return _f(overlap, sum(pred.values()), sum(ref.values()))


def lcs_length(a: list[str], b: list[str]) -> int:
    if not a or not b:
        return 0
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b, 1):
            current.append(previous[j - 1] + 1 if x == y else max(previous[j], current[j - 1]))
        previous = current
    return previous[-1]


def rouge_l(prediction: list[str], target: list[str]) -> float:
    if not prediction or not target:
        return 0.0
    return _f(lcs_length(prediction, target), len(prediction), len(target))


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(c for c in text.lower() if c not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def score_texts(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F-measure and exact match over pairs (empty input: all zero)."""
    if len(predictions) != len(references):
        raise ValueError("predictions and references differ in length")
    totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0, "exact_match": 0.0}
    for prediction, reference in zip(predictions, references, strict=True):
        p, r = rouge_tokens(prediction), rouge_tokens(reference)
        totals["rouge1"] += rouge_n(p, r, 1)
        totals["rouge2"] += rouge_n(p, r, 2)
        totals["rougeL"] += rouge_l(p, r)
        totals["exact_match"] += float(normalize_answer(prediction) == normalize_answer(reference))
    n = max(len(predictions), 1)
    return {k: v / n for k, v in totals.items()}


def per_example(prediction: str, reference: str) -> dict[str, float]:
    return score_texts([prediction], [reference])
