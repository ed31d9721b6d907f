"""`kubetune prepare` with data.format=preference, through the real CLI on files the test writes:
each pair becomes two documents (prompt + chosen answer + EOS, prompt + rejected answer + EOS)
that stay together through the split and packing; the answers are what the tokenizer and its
chat template make of them (checked against transformers directly); long prompts keep their
end; bad records get file:line errors."""

from __future__ import annotations

import json

import pytest
from datasets import load_from_disk

from kubetune.components.config import load_recipe
from kubetune.components.models import load_tokenizer

from .conftest import REPO, run_cli, write_jsonl

RECIPE = REPO / "pipelines" / "recipes" / "tiny-dpo.yaml"


def prepare(tmp_path, rows, *sets: str, out_name: str = "out"):
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    out = tmp_path / out_name
    overrides = [
        a for s in (f"data.path={path}", "data.eval_fraction=0", *sets) for a in ("--set", s)
    ]
    return run_cli("prepare", RECIPE, "--output", out, *overrides), out


def tokenizer(model: str = "tiny://falcon"):
    return load_tokenizer(load_recipe(RECIPE, [f"model.name_or_path={model}"]).model)


def documents(split) -> list[tuple[list[int], list[int]]]:
    docs = []
    for row in split:
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0]
        for a, b in zip(starts, starts[1:] + [len(row["input_ids"])], strict=True):
            docs.append((row["input_ids"][a:b], row["labels"][a:b]))
    return docs


def answer(doc) -> list[int]:
    ids, labels = doc
    return [i for i, label in zip(ids, labels, strict=True) if label != -100]


def prompt(doc) -> list[int]:
    ids, labels = doc
    return ids[: next(i for i, label in enumerate(labels) if label != -100)]


TEXT_PAIRS = [
    {"prompt": f"Question {i}: what is {i} plus {i}?\nAnswer:", "chosen": f" {2 * i}.",
     "rejected": " I do not know, ask someone else."}
    for i in range(12)
]  # fmt: skip


@pytest.mark.integration  # prepare end to end through the CLI
@pytest.mark.parametrize("packing", [True, False], ids=["packed", "unpacked"])
def test_text_pairs_become_two_documents_that_stay_together(tmp_path, packing):
    result, out = prepare(tmp_path, TEXT_PAIRS, f"data.packing={str(packing).lower()}")
    assert result.code == 0, result
    split = load_from_disk(str(out))["train"]
    tok = tokenizer()
    docs = documents(split)
    assert len(docs) == 2 * len(TEXT_PAIRS)
    for row in split:  # whole pairs only, one per row unpacked
        starts = sum(p == 0 for p in row["position_ids"])
        assert starts % 2 == 0 and (starts >= 2 if packing else starts == 2)
        assert len(row["input_ids"]) <= 2 * 128
    if not packing:
        assert len(split) == len(TEXT_PAIRS)
    else:
        assert len(split) < len(TEXT_PAIRS)  # pairs of ~40 tokens share 256-token rows
    seen = set()
    for chosen, rejected in zip(docs[0::2], docs[1::2], strict=True):
        assert prompt(chosen) == prompt(rejected)  # the prompt tokenized once per pair
        text = tok.decode(prompt(chosen))
        pair = next(p for p in TEXT_PAIRS if p["prompt"] == text)
        seen.add(text)
        eos = [tok.eos_token_id]
        want = tok(pair["chosen"], add_special_tokens=False)["input_ids"] + eos
        assert answer(chosen) == want
        assert (
            answer(rejected) == tok(pair["rejected"], add_special_tokens=False)["input_ids"] + eos
        )
    assert len(seen) == len(TEXT_PAIRS)
    stats = json.loads((out / "stats.json").read_text())
    assert stats["format"] == "preference" and stats["pairs"] == {"train": 12, "eval": 0}


@pytest.mark.integration  # prepare end to end through the CLI
def test_the_anthropic_hh_layout_shares_the_prompt_up_to_the_last_assistant_turn(tmp_path):
    rows = [
        {
            "chosen": f"\n\nHuman: Hi {i}\n\nAssistant: Hello.\n\nHuman: Help me?\n\nAssistant: "
            f"Sure, here is how {i}.",
            "rejected": f"\n\nHuman: Hi {i}\n\nAssistant: Hello.\n\nHuman: Help me?\n\nAssistant: "
            "Sure, no.",
        }
        for i in range(4)
    ]
    result, out = prepare(tmp_path, rows, "data.packing=false")
    assert result.code == 0, result
    tok = tokenizer()
    docs = documents(load_from_disk(str(out))["train"])
    for chosen, rejected in zip(docs[0::2], docs[1::2], strict=True):
        text = tok.decode(prompt(chosen))
        assert text.endswith("\n\nHuman: Help me?\n\nAssistant:")
        assert tok.decode(answer(chosen)[:-1]).startswith(" Sure, here is how")
        assert tok.decode(answer(rejected)[:-1]) == " Sure, no."


@pytest.mark.integration  # prepare end to end through the CLI
def test_ultrafeedback_message_lists_render_with_the_chat_template(tmp_path):
    """The shared messages are the prompt (rendered with the generation prompt); each answer is
    what the full conversation's render adds (checked with apply_chat_template itself)."""
    rows = []
    for i in range(4):
        user = {"role": "user", "content": f"Name a colour, please ({i})."}
        rows.append(
            {
                "prompt": user["content"],
                "chosen": [user, {"role": "assistant", "content": "Blue."}],
                "rejected": [user, {"role": "assistant", "content": "No."}],
                "score_chosen": 8.0,
                "score_rejected": 2.0,
            }
        )
    result, out = prepare(tmp_path, rows, "data.packing=false", "model.name_or_path=tiny://qwen3")
    assert result.code == 0, result
    tok = tokenizer("tiny://qwen3")
    docs = documents(load_from_disk(str(out))["train"])
    for (chosen, rejected), row in zip(zip(docs[0::2], docs[1::2], strict=True), rows, strict=True):
        user = row["chosen"][:1]
        head = tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        full = tok.apply_chat_template(row["chosen"], tokenize=False)
        assert prompt(chosen) == tok(head, add_special_tokens=False)["input_ids"]
        want = tok(full[len(head) :], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert answer(chosen) == want
        assert "No." in tok.decode(answer(rejected))


@pytest.mark.integration  # prepare end to end through the CLI
def test_a_long_prompt_keeps_its_end_and_a_long_answer_loses_its_tail(tmp_path):
    tok = tokenizer()
    long_prompt = " ".join(f"word{i}" for i in range(200)) + "\nAnswer:"
    rows = [{"prompt": long_prompt, "chosen": " yes " * 100, "rejected": " no."}] * 2
    result, out = prepare(
        tmp_path, rows, "data.packing=false", "data.max_seq_len=64", "data.max_prompt_len=16"
    )
    assert result.code == 0, result
    docs = documents(load_from_disk(str(out))["train"])
    full = tok(long_prompt, add_special_tokens=False)["input_ids"]
    assert prompt(docs[0]) == full[-16:]  # the end, next to the answer
    assert len(docs[0][0]) == 64 and answer(docs[0])[-1] != tok.eos_token_id  # cut, EOS too
    assert answer(docs[1])[-1] == tok.eos_token_id  # the short answer whole
    stats = json.loads((out / "stats.json").read_text())
    assert stats["truncated_rows"] == 2
    result, out = prepare(
        tmp_path, rows, "data.max_seq_len=64", "data.max_prompt_len=16", "data.overlength=drop",
        out_name="dropped",
    )  # fmt: skip
    assert result.code == 2 and "no usable rows left out of 2 (too_long: 2)" in result.err


@pytest.mark.integration  # prepare end to end through the CLI
@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"prompt": "Q", "chosen": "A"}, "missing field 'rejected'"),
        ({"prompt": "Q", "chosen": " same", "rejected": "same "}, "`chosen` and `rejected` are"),
        ({"prompt": "Q", "chosen": "  ", "rejected": "B"}, "empty chosen answer"),
        ({"chosen": "just text", "rejected": "other text"}, "no prompt"),
        ({"prompt": "Q", "chosen": [1], "rejected": "B"}, "chosen[0] must be an object"),
    ],
    ids=["missing", "identical", "empty", "no-prompt", "bad-type"],
)
def test_bad_records_get_file_line_errors(tmp_path, row, message):
    rows = TEXT_PAIRS[:3] + [row] + TEXT_PAIRS[3:]
    result, out = prepare(tmp_path, rows)
    assert result.code == 2, result
    assert f"pairs.jsonl:4: {message}" in result.err and "Traceback" not in result.err
    assert not out.exists()
    result, out = prepare(tmp_path, rows, "data.on_bad_row=drop", out_name="kept")
    assert result.code == 0, result
    stats = json.loads((out / "stats.json").read_text())
    assert stats["rows_dropped_total"] == 1 and stats["pairs"]["train"] == len(TEXT_PAIRS)


def test_preference_settings_are_checked_against_the_objective():
    from kubetune.components.errors import UserError

    demo = REPO / "pipelines" / "recipes" / "tiny-demo.yaml"
    cases = [
        (RECIPE, ["train.objective=sft"], "data.format=preference holds pairs for a preference"),
        (demo, ["data.max_prompt_len=10"], "data.max_prompt_len is for data.format=preference"),
        (RECIPE, ["data.max_prompt_len=128"], "leaves no room for an answer"),
        (RECIPE, ["preference.gamma=0.5"], "preference.gamma has no meaning for train.objecti"),
        (RECIPE, ["train.objective=simpo", "train.reference=live"], "needs no reference"),
        (RECIPE, ["preference.label_smoothing=0.5"], "preference.label_smoothing must be < 0.5"),
        (
            RECIPE,
            ["method=full", "train.reference=live", "distributed.strategy=deepspeed"],
            "set train.reference=precomputed",
        ),
    ]
    for recipe, sets, message in cases:
        with pytest.raises(UserError, match=message):
            load_recipe(recipe, sets)


def test_the_kfp_metrics_carry_the_preference_figures(tmp_path):
    """The train task's Metrics add the objective's eval metrics (eval_reward_accuracy ...);
    the evaluate task's add each model's preference and reward accuracy."""
    from kubetune.components.evaluate.step import kfp_metrics
    from kubetune.components.train.kfp_body import eval_figures

    record = {"eval_loss": 0.41, "eval_metrics": {"reward_accuracy": 0.9, "reward_margin": 1.2}}
    (tmp_path / "metrics.json").write_text(json.dumps(record))
    assert eval_figures(tmp_path) == {
        "eval_loss": 0.41, "eval_reward_accuracy": 0.9, "eval_reward_margin": 1.2,
    }  # fmt: skip
    side = {"eval_loss": 6.2, "perplexity": None, "rouge1": 0.4, "rouge2": 0.2, "rougeL": 0.3,
            "exact_match": 0.0, "preference_accuracy": 0.87}  # fmt: skip
    flat = kfp_metrics(
        {"tuned": {**side, "reward_accuracy": 0.9}, "baseline": {**side, "preference_accuracy": 0.58},
         "gate": {"passed": True}}
    )  # fmt: skip
    assert flat["tuned_preference_accuracy"] == 0.87 and flat["tuned_reward_accuracy"] == 0.9
    assert flat["baseline_preference_accuracy"] == 0.58 and "baseline_reward_accuracy" not in flat
