"""train (tiny, lora) → merge → evaluate --baseline → push to S3 → pull, through the real CLI.

Every number kubetune reports is recomputed here another way: ROUGE with Google's
`rouge_score`, losses and greedy answers with plain transformers, object bytes with boto3 and
hashlib, and the pulled model's logits against the merged model's.
"""

from __future__ import annotations

import json
import math
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from datasets import load_from_disk
from transformers import AutoModelForCausalLM, AutoTokenizer

from kubetune.components.models import resolve_model

from .conftest import TINY_DEMO, assert_user_error, run_cli, run_prepare
from .s3server import S3Server

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_dataset, tiny_adapter):
    """ROOT/dataset, ROOT/run (the adapter) and ROOT/merged: the session's shared dataset and
    adapter (links) and their merge."""
    root = tmp_path_factory.mktemp("e2e")
    (root / "dataset").symlink_to(tiny_dataset, target_is_directory=True)
    (root / "run").symlink_to(tiny_adapter, target_is_directory=True)
    result = run_cli("merge", TINY_DEMO, "--adapter", tiny_adapter, "--output", root / "merged")
    assert result.code == 0, result
    return root


@pytest.fixture(scope="module")
def evaluated(trained):
    out = trained / "eval"
    result = run_cli(
        "evaluate",
        TINY_DEMO,
        "--model",
        trained / "merged",
        "--dataset",
        trained / "dataset",
        "--output",
        out,
        "--baseline",
        "tiny://falcon",
    )
    assert result.code == 0, result
    assert "tuned" in result.out and "base" in result.out
    return out


def load(path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def plain_loss(model, rows) -> float:
    """Token-weighted loss, one row at a time, by transformers' own labels shift."""
    total = tokens = 0.0
    with torch.no_grad():
        for row in rows:
            labels = torch.tensor([row["labels"]])
            out = model(input_ids=torch.tensor([row["input_ids"]]), labels=labels)
            n = int((labels[:, 1:] != -100).sum())
            total, tokens = total + float(out.loss) * n, tokens + n
    return total / tokens


def test_metrics_agree_with_independent_computations(trained, evaluated):
    from rouge_score import rouge_scorer

    metrics = json.loads((evaluated / "metrics.json").read_text())
    generations = [json.loads(line) for line in (evaluated / "generations.jsonl").open()]
    eval_split = load_from_disk(str(trained / "dataset"))["eval"]
    assert metrics["num_prompts"] == len(generations) == 16
    assert metrics["eval_rows"] == len(eval_split) == 60

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"])
    for side in ("tuned", "baseline"):
        scores = [scorer.score(g["reference"], g[side]) for g in generations]
        for key in ("rouge1", "rouge2", "rougeL"):
            expected = sum(s[key].fmeasure for s in scores) / len(scores)
            assert metrics[side][key] == pytest.approx(expected, abs=1e-9), (side, key)
        exact = sum(g[side].strip().lower() == g["reference"].strip().lower() for g in generations)
        assert metrics[side]["exact_match"] == pytest.approx(exact / len(generations))
    assert metrics["tuned"]["rougeL"] > 0  # the tuned model writes words of the summaries

    # losses: the training run's own eval loss, and plain transformers on the base
    training = json.loads((trained / "run" / "metrics.json").read_text())
    assert metrics["tuned"]["eval_loss"] == pytest.approx(training["eval_loss"], rel=1e-4)
    base_loss = plain_loss(load(resolve_model("tiny://falcon")), eval_split)
    assert metrics["baseline"]["eval_loss"] == pytest.approx(base_loss, rel=1e-4)
    assert metrics["tuned"]["perplexity"] == pytest.approx(math.exp(metrics["tuned"]["eval_loss"]))
    assert metrics["tuned"]["eval_loss"] < metrics["baseline"]["eval_loss"]
    rouge_l = metrics["tuned"]["rougeL"]  # the recipe's gate: eval.min_rouge_l 0.2
    assert metrics["gate"] == {
        "passed": rouge_l >= 0.2,
        "checks": [
            {
                "metric": "rougeL",
                "op": ">=",
                "threshold": 0.2,
                "value": rouge_l,
                "passed": rouge_l >= 0.2,
            }
        ],
    }

    # batched, left-padded answers equal transformers' greedy answer to each prompt alone
    model = load(trained / "merged")
    tokenizer = AutoTokenizer.from_pretrained(str(trained / "merged"))
    for i in (0, 5, 11):
        row = eval_split[i]
        start = next(j for j, label in enumerate(row["labels"]) if label != -100)
        prompt = torch.tensor([row["input_ids"][:start]])
        with torch.no_grad():
            out = model.generate(
                input_ids=prompt, max_new_tokens=32, do_sample=False, pad_token_id=0
            )
        text = tokenizer.decode(out[0, start:], skip_special_tokens=True).strip()
        assert generations[i]["tuned"] == text
        assert generations[i]["prompt"] == row["prompt"]
        assert generations[i]["reference"] == row["reference"]


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.text = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)

    def handle_data(self, data):
        self.text.append(data)


def test_report_is_a_readable_page(evaluated):
    html = (evaluated / "report.html").read_text()
    metrics = json.loads((evaluated / "metrics.json").read_text())
    generations = [json.loads(line) for line in (evaluated / "generations.jsonl").open()]
    page = _Collect()
    page.feed(html)
    text = "".join(page.text)
    assert "svg" in page.tags and "polyline" in page.tags  # the loss curve
    assert page.tags.count("tr") == 1 + 6 + 1 + len(generations)  # metrics and generations
    assert f"{metrics['tuned']['rougeL']:.4f}" in text
    assert f"{metrics['baseline']['eval_loss']:.4f}" in text
    for g in generations:  # prompts and answers appear as text (escaped in the HTML)
        assert g["reference"] in text and g["tuned"] in text


def test_adapter_folder_evaluates_like_the_merged_model(trained, evaluated, tmp_path):
    out = tmp_path / "eval-adapter"
    result = run_cli(
        "evaluate",
        TINY_DEMO,
        "--model",
        trained / "run",
        "--dataset",
        trained / "dataset",
        "--output",
        out,
        "--set",
        "eval.min_rouge_l=0.99",
    )
    assert result.code == 0, result
    via_adapter = json.loads((out / "metrics.json").read_text())
    merged = json.loads((evaluated / "metrics.json").read_text())
    assert via_adapter["baseline"] is None
    assert via_adapter["tuned"]["eval_loss"] == pytest.approx(
        merged["tuned"]["eval_loss"], rel=1e-4
    )
    assert via_adapter["gate"]["passed"] is False and "quality gate: FAILED" in result.out


def test_evaluate_errors(trained, tmp_path):
    def evaluate(model, dataset, out, *extra):
        return run_cli(
            "evaluate", TINY_DEMO, "--model", model, "--dataset", dataset, "--output", out, *extra
        )

    bad = evaluate(trained / "merged", tmp_path, tmp_path / "o")
    assert_user_error(bad, "not a `kubetune prepare` output")
    no_eval = tmp_path / "no-eval"
    assert run_prepare(no_eval, "data.eval_fraction=0").code == 0
    assert_user_error(evaluate(trained / "merged", no_eval, tmp_path / "o"), "has no eval split")
    assert_user_error(
        evaluate(tmp_path, trained / "dataset", tmp_path / "o"), "neither a model folder"
    )
    assert not (tmp_path / "o").exists()
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("x")
    assert_user_error(
        evaluate(trained / "merged", trained / "dataset", tmp_path / "taken"),
        "already exists; pass --overwrite",
    )


def test_push_pull_round_trip_keeps_the_model(trained, evaluated, tmp_path):
    server = S3Server()
    try:
        server.client().create_bucket(Bucket="models")
        dest = "s3://models/tiny-demo/v1"
        pushed = run_cli(
            "push",
            trained / "merged",
            dest,
            "--metrics",
            evaluated / "metrics.json",
            env=server.env(),
        )
        assert pushed.code == 0, pushed
        pulled_dir = tmp_path / "pulled"
        pulled = run_cli("pull", dest, pulled_dir, env=server.env())
        assert pulled.code == 0, pulled
    finally:
        server.stop()
    manifest = json.loads((pulled_dir / "manifest.json").read_text())
    stats = json.loads((trained / "dataset" / "stats.json").read_text())
    assert manifest["kind"] == "merged" and manifest["method"] == "lora"
    assert manifest["base_model"]["name_or_path"] == "tiny://falcon"
    assert manifest["dataset_fingerprint"] == stats["fingerprint"]
    assert manifest["metrics"]["evaluation"] == json.loads((evaluated / "metrics.json").read_text())
    assert manifest["metrics"]["training"]["steps"] == 24
    assert manifest["recipe"]["model"]["name_or_path"] == "tiny://falcon"
    merged_files = {
        p.relative_to(trained / "merged").as_posix()
        for p in (trained / "merged").rglob("*")
        if p.is_file()
    }
    assert {f["path"] for f in manifest["files"]} == merged_files

    ids = torch.tensor([[5, 9, 300, 17, 2, 44, 1000, 7]])
    with torch.no_grad():
        expected = load(trained / "merged")(input_ids=ids).logits
        got = load(pulled_dir)(input_ids=ids).logits
    assert torch.equal(expected, got)
    assert not torch.equal(expected, load(resolve_model("tiny://falcon"))(input_ids=ids).logits)


def test_evaluate_component_under_kfp_local(trained, tmp_path, monkeypatch):
    from kfp import local

    from kubetune.components.config import dump_config, load_recipe
    from kubetune.components.evaluate.component import evaluate_model, quality_gate

    monkeypatch.chdir(tmp_path)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "root"))
    cfg = load_recipe(str(TINY_DEMO), ["eval.num_prompts=4", "eval.max_eval_loss=100"])
    task = evaluate_model(
        recipe_yaml=dump_config(cfg),
        model_dir=str(trained / "merged"),
        dataset_dir=str(trained / "dataset"),
        run_dir=str(tmp_path / "run"),
    )
    eval_dir = Path(task.outputs["Output"])
    assert eval_dir == tmp_path / "run" / "eval"
    written = json.loads((eval_dir / "metrics.json").read_text())
    logged = task.outputs["metrics"].metadata
    assert logged["tuned_eval_loss"] == pytest.approx(written["tuned"]["eval_loss"])
    assert logged["baseline_eval_loss"] == pytest.approx(written["baseline"]["eval_loss"])
    assert logged["gate_passed"] == float(written["gate"]["passed"])
    assert written["baseline"]["model"] == "tiny://falcon"  # the pipeline always compares
    assert Path(task.outputs["report"].path).read_text() == (eval_dir / "report.html").read_text()
    assert quality_gate(eval_dir=str(eval_dir)).output is written["gate"]["passed"]
