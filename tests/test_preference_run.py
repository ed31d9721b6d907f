"""Preference tuning end to end: `kubetune run tiny-dpo.yaml --local` (prepare, DPO with LoRA on
two gloo workers, merge, evaluate, gate, push) learns the sample pairs — held-out accuracy
from about chance (the base) to at least 0.8 — and the three ways to get the reference agree
(the adapters switched off, a frozen copy, log-probabilities computed before training)."""

from __future__ import annotations

import json

import pytest

from .conftest import REPO, run_cli

RECIPE = REPO / "pipelines" / "recipes" / "tiny-dpo.yaml"

pytestmark = pytest.mark.integration


def test_run_local_dpo_learns_the_preferences(tmp_path):
    result = run_cli(
        "run", RECIPE, "--local", "--set", f"output.uri={tmp_path / 'model'}",
        "--workspace", tmp_path / "work", cwd=tmp_path,
    )  # fmt: skip
    assert result.code == 0, result
    assert "pref acc" in result.out and "reward acc" in result.out
    evals = list((tmp_path / "work").glob("runs/*/eval/metrics.json"))
    assert len(evals) == 1
    metrics = json.loads(evals[0].read_text())
    base, tuned = metrics["baseline"], metrics["tuned"]
    assert tuned["pairs"] == base["pairs"] == 60
    assert 0.3 <= base["preference_accuracy"] <= 0.7  # the random base: about chance
    assert tuned["preference_accuracy"] >= 0.8
    assert tuned["reward_accuracy"] >= 0.8  # DPO's own measure, the base as the reference
    training = json.loads((evals[0].parent.parent / "train" / "metrics.json").read_text())
    assert training["objective"] == "dpo" and training["reference"] == "live"
    assert training["eval_metrics"]["reward_accuracy"] >= 0.8
    assert training["eval_metrics"]["reward_margin"] > 0
    logged = training["objective_metrics"]
    assert {"rewards_chosen", "rewards_rejected", "reward_accuracy", "reward_margin"} <= set(logged)
    assert len(logged["reward_accuracy"]) == len(training["loss"])  # every logged step
    report = (evals[0].parent / "report.html").read_text()
    assert "preference accuracy (held-out pairs)" in report and "reward_accuracy" in report
    assert (tmp_path / "model" / "manifest.json").is_file()  # the gate passed, pushed
    run_dir = evals[0].parent.parent
    mine = preference_accuracy(run_dir / "model", run_dir / "dataset")
    assert tuned["preference_accuracy"] == pytest.approx(mine, abs=1.5 / 60)  # a near tie at most


def preference_accuracy(model_dir, dataset) -> float:
    """Held-out pairs whose chosen answer the model gives the higher mean log-probability per
    answer token: each document alone through transformers, no kubetune code."""
    import torch
    from datasets import load_from_disk
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    wins = pairs = 0
    for row in load_from_disk(str(dataset))["eval"]:
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["input_ids"])]
        means = []
        for a, b in zip(starts[:-1], starts[1:], strict=True):
            ids, labels = torch.tensor([row["input_ids"][a:b]]), torch.tensor(row["labels"][a:b])
            with torch.no_grad():
                logps = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
            target = labels[1:]
            picked = logps[target != -100].gather(1, target[target != -100][:, None])
            means.append(float(picked.mean()))
        wins += means[0] > means[1]
        pairs += 1
    return wins / pairs


def train(tmp_path, name: str, *sets: str) -> dict:
    out = tmp_path / name
    args = [a for s in ("train.max_steps=6", "distributed.procs_per_node=1", *sets)
            for a in ("--set", s)]  # fmt: skip
    result = run_cli("train", RECIPE, "--dataset", tmp_path / "data", "--output", out, *args)
    assert result.code == 0, result
    return json.loads((out / "metrics.json").read_text())


def test_the_reference_is_the_same_live_switched_off_copied_or_precomputed(tmp_path):
    prepared = run_cli(
        "prepare", RECIPE, "--output", tmp_path / "data", "--set", "data.max_rows=120"
    )
    assert prepared.code == 0, prepared
    runs = {
        "lora-live": train(tmp_path, "lora-live"),
        "lora-precomputed": train(tmp_path, "lora-pre", "train.reference=precomputed"),
        "full-live": train(
            tmp_path, "full-live", "method=full", "train.lr=1e-4", "train.reference=live"
        ),  # fmt: skip
        "full-precomputed": train(tmp_path, "full-pre", "method=full", "train.lr=1e-4"),
    }
    assert runs["full-precomputed"]["reference"] == "precomputed"  # auto, for method=full
    assert (tmp_path / "full-pre" / "reference" / "reference.json").is_file()
    for method in ("lora", "full"):
        live, pre = runs[f"{method}-live"], runs[f"{method}-precomputed"]
        assert [round(v, 4) for _, v in live["loss"]] == [round(v, 4) for _, v in pre["loss"]]
        assert live["eval_metrics"] == pytest.approx(pre["eval_metrics"], abs=1e-4)
    # the first step's loss is log 2 (policy = reference) for every one of them
    for record in runs.values():
        assert record["loss"][0][1] == pytest.approx(0.6931, abs=2e-3)


def test_a_resumed_run_reads_its_precomputed_reference_back(tmp_path):
    """method=full (precomputed by default): interrupted after its step-4 checkpoint and run
    again, it resumes with the log-probabilities it stored (not recomputed from the trained
    weights) and ends with the uninterrupted run's losses."""
    prepared = run_cli(
        "prepare", RECIPE, "--output", tmp_path / "data", "--set", "data.max_rows=80"
    )
    assert prepared.code == 0, prepared
    sets = ["method=full", "train.lr=1e-4", "train.save_steps=4", "train.max_steps=8"]
    straight = train(tmp_path, "run", *sets)
    out = tmp_path / "run"
    for name in ("metrics.json", "model.safetensors"):
        (out / name).unlink()
    checkpoints = sorted((out / "checkpoints").iterdir())
    assert [p.name for p in checkpoints] == ["step-0000004"]  # (the last step saves none)
    args = [a for s in ("distributed.procs_per_node=1", *sets) for a in ("--set", s)]
    result = run_cli("train", RECIPE, "--dataset", tmp_path / "data", "--output", out, *args)
    assert result.code == 0, result
    assert "resuming from" in result.out and "computed before training" not in result.out
    resumed = json.loads((out / "metrics.json").read_text())
    assert resumed["resumed_from_step"] == 4
    for (step, a), (_, b) in zip(straight["loss"], resumed["loss"], strict=True):
        assert a == pytest.approx(b, abs=1e-5), step
    # another dataset's reference in the output is refused, naming the folder
    record = out / "reference" / "reference.json"
    record.write_text(record.read_text().replace(straight["dataset_fingerprint"], "0" * 64))
    for name in ("metrics.json", "model.safetensors"):
        (out / name).unlink()
    result = run_cli("train", RECIPE, "--dataset", tmp_path / "data", "--output", out, *args)
    assert result.code == 2 and "reference log-probabilities of another dataset" in result.err
