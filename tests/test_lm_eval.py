"""The forgetting check (eval.lm_eval_tasks, eval.max_regression) through `kubetune evaluate`,
offline, with a multiple-choice task the test writes: its YAML in lm-eval's task format and its
data beside it. Every score kubetune reports is recomputed here by hand: each choice's summed
log-probability under plain transformers (and peft for the adapter), the argmax against the
gold label, as lm-evaluation-harness defines `acc` for a multiple-choice task."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import yaml
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from kubetune.components.config import load_recipe
from kubetune.components.evaluate.harness import regression_checks, side_by_side
from kubetune.components.models import resolve_model

from .conftest import TINY_DEMO, assert_user_error, run_cli

COLOURS = ["red", "green", "blue", "white", "black", "yellow"]
THINGS = ["sky", "grass", "snow", "coal", "sun", "sea", "leaf", "cloud", "night", "lemon"]


def documents() -> list[dict]:
    rng = random.Random(4)
    docs = []
    for thing in THINGS:
        for verb in ("is", "looks"):
            docs.append({"question": f"The {thing} {verb}", "choices": rng.sample(COLOURS, 3)})
    return docs


def choice_logprob(model, tok, context: str, continuation: str) -> float:
    """Summed log-probability of continuation's tokens after context (lm-eval's split: the
    continuation is what the whole string adds to the context's tokens)."""
    context_ids = tok(context).input_ids
    whole = tok(context + continuation).input_ids
    ids = torch.tensor([whole])
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float().log_softmax(-1)[0]
    return sum(float(logits[i - 1, whole[i]]) for i in range(len(context_ids), len(whole)))


def picks(model, tok, docs) -> list[int]:
    return [
        max(
            range(len(d["choices"])),
            key=lambda c, d=d: choice_logprob(model, tok, d["question"], " " + d["choices"][c]),
        )
        for d in docs
    ]


def write_task(folder: Path, docs: list[dict]) -> Path:
    folder.mkdir(parents=True)
    with open(folder / "colours.jsonl", "w") as f:
        for d in docs:
            f.write(json.dumps(d) + "\n")
    task = {
        "task": "tiny_colours",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": "colours.jsonl"}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{question}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "label",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
    }
    path = folder / "colours.yaml"
    path.write_text(yaml.safe_dump(task))
    return path


@pytest.mark.integration
def test_forgetting_check_scores_both_models_and_fails_the_gate(
    tiny_dataset, tiny_adapter, tmp_path
):
    base_path = resolve_model("tiny://falcon")
    tok = AutoTokenizer.from_pretrained(base_path)
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32).eval()
    docs = documents()
    base_picks = picks(base, tok, docs)
    tuned = PeftModel.from_pretrained(base, str(tiny_adapter)).eval()
    tuned_picks = picks(tuned, tok, docs)
    # the gold answer is the base model's pick: base scores 1, the tuned model its agreement
    for d, pick in zip(docs, base_picks, strict=True):
        d["label"] = pick
    limit = 16  # lm-eval scores the first `limit` documents
    agreement = sum(b == t for b, t in zip(base_picks[:limit], tuned_picks[:limit], strict=True))
    tuned_acc = agreement / limit
    assert tuned_acc < 1, "the trained adapter should change some picks"
    task_file = write_task(tmp_path / "tasks", docs)
    drop = 1 - tuned_acc

    out = tmp_path / "eval"
    result = run_cli(
        "evaluate", TINY_DEMO, "--model", tiny_adapter, "--dataset", tiny_dataset,
        "--output", out,
        "--set", f"eval.lm_eval_tasks=[{task_file}]",
        "--set", f"eval.lm_eval_limit={limit}",
        "--set", f"eval.max_regression={drop - 1 / (2 * limit)}",
        "--set", "eval.num_prompts=2",
        "--set", "eval.min_rouge_l=null",  # the forgetting check is the only bound
        cwd=tmp_path,
    )  # fmt: skip
    assert result.code == 0, result
    metrics = json.loads((out / "metrics.json").read_text())
    # no --baseline: the forgetting check scores the recipe's base model
    assert metrics["baseline"]["model"] == "tiny://falcon"
    (row,) = metrics["lm_eval"]["tasks"]
    assert row["task"] == "tiny_colours" and row["metric"] == "acc"
    assert row["samples"] == limit
    assert row["base"] == pytest.approx(1.0)
    assert row["tuned"] == pytest.approx(tuned_acc)
    assert row["regression"] == pytest.approx(drop)
    assert metrics["tuned"]["lm_eval"][0]["value"] == pytest.approx(tuned_acc)
    (check,) = [c for c in metrics["gate"]["checks"] if "tiny_colours" in c["metric"]]
    assert check["value"] == pytest.approx(drop) and check["passed"] is False
    assert metrics["gate"]["passed"] is False
    assert "quality gate: FAILED: tiny_colours acc drop\n" in result.out
    assert f"tiny_colours acc   1.0000 {tuned_acc:8.4f} {-drop:+8.4f}" in result.out
    report = (out / "report.html").read_text()
    assert "Forgetting check" in report and "tiny_colours" in report
    assert f"{tuned_acc:.4f}" in report and f"{-drop:+.4f}" in report


def test_missing_and_empty_task_files_are_named(tiny_dataset, tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("description: not a task\n")

    def evaluate(task):
        return run_cli(
            "evaluate", TINY_DEMO, "--model", "tiny://falcon", "--dataset", tiny_dataset,
            "--output", tmp_path / "out", "--set", f"eval.lm_eval_tasks=[{task}]",
        )  # fmt: skip

    assert_user_error(
        evaluate(tmp_path / "gone.yaml"), "eval.lm_eval_tasks[0]", "gone.yaml: no such task file"
    )
    assert_user_error(evaluate(empty), "eval.lm_eval_tasks[0]", "defines no lm-eval task")
    assert not (tmp_path / "out").exists()


def test_max_regression_needs_tasks(cli):
    result = cli("config", TINY_DEMO, "--set", "eval.max_regression=0.02")
    assert_user_error(result, "eval.max_regression needs eval.lm_eval_tasks")


def test_regression_follows_the_metrics_direction():
    cfg = load_recipe(str(TINY_DEMO), ["eval.lm_eval_tasks=[x.yaml]", "eval.max_regression=0.5"])

    def score(task, value, higher):
        return {"task": task, "metric": "m", "value": value, "stderr": None,
                "higher_is_better": higher, "samples": 4}  # fmt: skip

    base = [score("acc", 0.75, True), score("ppl", 10.0, False), score("better", 0.5, True)]
    tuned = [score("acc", 0.5, True), score("ppl", 10.75, False), score("better", 0.625, True)]
    rows = side_by_side(base, tuned)
    assert [r["change"] for r in rows] == [-0.25, 0.75, 0.125]
    assert [r["regression"] for r in rows] == [0.25, 0.75, -0.125]  # a rise in ppl is a fall
    checks = regression_checks(cfg, rows)
    assert [c["passed"] for c in checks] == [True, False, True]
    assert all(c["threshold"] == 0.5 and c["op"] == "<=" for c in checks)
    assert regression_checks(load_recipe(str(TINY_DEMO)), rows) == []
