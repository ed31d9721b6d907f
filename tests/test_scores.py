"""kubetune's ROUGE against Google's rouge_score on awkward text; exact match normalisation."""

from __future__ import annotations

import pytest
from rouge_score import rouge_scorer

from kubetune.components.evaluate.scores import normalize_answer, score_texts

PAIRS = [
    ("the cat sat on the mat", "the cat is on a mat"),
    ("Anna is late; Zoe waits.", "Anna is late -- Zoe is waiting at the cafe!"),
    ("", "something"),
    ("something", ""),
    ("", ""),
    ("a a a a b", "a b a"),
    ("Tom: will call at 5 pm", "Tom will call at 5pm"),
    ("Café déjà vu 42", "cafe deja vu 42"),  # non-ASCII letters are separators, as in rouge_score
    ("x " * 200, ("x y " * 150).strip()),
]


@pytest.mark.parametrize("prediction, reference", PAIRS)
def test_rouge_equals_rouge_score(prediction, reference):
    expected = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"]).score(reference, prediction)
    got = score_texts([prediction], [reference])
    for key in ("rouge1", "rouge2", "rougeL"):
        assert got[key] == pytest.approx(expected[key].fmeasure, abs=1e-12), key


def test_means_over_examples_and_exact_match():
    predictions, references = [p for p, _ in PAIRS], [r for _, r in PAIRS]
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    expected = sum(scorer.score(r, p)["rougeL"].fmeasure for p, r in PAIRS) / len(PAIRS)
    got = score_texts(predictions, references)
    assert got["rougeL"] == pytest.approx(expected, abs=1e-12)
    # ("", "") and ("a a a a b", "a b a"): SQuAD normalisation drops articles, leaving "b"
    assert got["exact_match"] == pytest.approx(2 / len(PAIRS))
    assert normalize_answer("The  Cat, sat!") == normalize_answer("cat sat")
    assert score_texts(["Yes."], ["yes"])["exact_match"] == 1.0
    assert score_texts([], []) == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0, "exact_match": 0.0}
