"""evaluate: generations for held-out prompts, loss/perplexity, ROUGE and exact match, for the
tuned model and (optionally) the base model side by side; metrics.json, generations.jsonl and
a report.html a person reads.

Preference data (pairs): the eval loss is the chosen answers' mean loss per token, and each
model's `preference_accuracy` the share of held-out pairs whose chosen answer it gives the
higher mean log-probability per token; the tuned model's `reward_accuracy` is DPO's implicit
reward accuracy with the base as the reference. Generations answer each pair's prompt, scored
against its chosen answer.

Prompts are the eval split's own prompt tokens (exactly what training conditioned on), the
first `eval.num_prompts` rows, generated in batches of `eval.batch_size` with left padding and
greedy decoding unless `eval.do_sample`. Eval loss is the token-weighted mean cross entropy over
the response tokens of the whole eval split, the same quantity training reports.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..artifacts import (
    DATASET_DICT_FILE,
    IGNORE_INDEX,
    METRICS_FILE,
    STATS_FILE,
    TRAINING_METRICS_FILE,
    BaseModelRecord,
    ModelKind,
    model_folder,
    write_json,
)
from ..config import RunConfig, write_resolved
from ..data_model_match import check_data_matches_model
from ..errors import UserError
from ..models import load_tokenizer, model_source, resolve_model
from ..outputs import check_output, staged_output
from . import harness
from .pairs import answer_logps, documents, preference_scores, reward_accuracy, right_padded
from .report import render_report
from .scores import per_example, score_texts


def _device_and_dtype() -> tuple[torch.device, torch.dtype]:
    if torch.cuda.is_available():
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.device("cuda"), dtype
    return torch.device("cpu"), torch.float32


@dataclass(frozen=True)
class ModelLocation:
    """Where a model to evaluate loads from: the base's source and revision, and the adapter
    folder on top of it (kind "lora": peft; "prompts": kubetune's LLaMA-Adapter) or none."""

    source: str
    revision: str | None
    adapter: Path | None = None
    kind: str | None = None


def locate(name: str, cfg: RunConfig) -> ModelLocation:
    """A merged/full model folder, a `kubetune train` adapter folder (LoRA, or LLaMA-Adapter
    served unmerged: on its base, or on the merged weights beside it), or any model id that
    `model.name_or_path` accepts (hub id, s3://, tiny://)."""
    path = Path(name)
    folder = model_folder(path)
    base_name = name
    if path.is_dir() and folder.needs_base:
        record = BaseModelRecord.read(path)
        base_name = record.name_or_path if record else cfg.model.name_or_path
    elif path.exists() and folder.kind is ModelKind.FILES:
        raise UserError(f"{name}: neither a model folder (config.json) nor an adapter folder")
    # the recipe's own base loads from its fetched copy, when the pipeline fetched one
    source = model_source(cfg.model) if base_name == cfg.model.name_or_path else None
    source = source or resolve_model(base_name)
    revision = None if Path(source).exists() else cfg.model.revision
    if not path.is_dir():
        kind = None
    elif folder.has_prompts:
        kind = "prompts"
    else:
        kind = "lora" if folder.needs_base else None
    return ModelLocation(source, revision, path if kind else None, kind)


def load_model(name: str, cfg: RunConfig, dtype: torch.dtype, device: torch.device):
    """The model `locate` finds, in transformers (and peft, or kubetune's LLaMA-Adapter)."""
    from transformers import AutoModelForCausalLM

    from ..methods.llama_adapter import load_into

    where = locate(name, cfg)
    placement = {"device_map": "auto"} if device.type == "cuda" else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(
            where.source,
            dtype=dtype,
            revision=where.revision,
            trust_remote_code=cfg.model.trust_remote_code,
            attn_implementation="sdpa",
            **placement,
        )
    except (OSError, ValueError) as exc:
        raise UserError(f"{name}: cannot load the model: {str(exc).splitlines()[0]}") from None
    if where.kind == "prompts" and where.adapter is not None:
        load_into(model, where.adapter)
    elif where.kind == "lora":
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(where.adapter))
    if device.type != "cuda":
        model.to(device)
    return model.eval()


def prompt_ids(row: dict) -> list[int]:
    """The row's tokens before its first trained label: the prompt the model answers."""
    labels = row["labels"]
    start = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))
    return list(row["input_ids"][:start])


@torch.no_grad()
def eval_loss(model, split, batch_size: int, pad_id: int) -> tuple[float | None, int]:
    """Token-weighted mean loss over every row's trained labels, and the token count."""
    device = next(model.parameters()).device
    loss_sum, tokens = 0.0, 0
    for start in range(0, len(split), batch_size):
        rows = split[start : start + batch_size]
        ids, labels, mask = right_padded(rows["input_ids"], rows["labels"], pad_id)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        targets = labels[:, 1:].to(device)
        loss_sum += float(
            torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]),
                targets.reshape(-1),
                ignore_index=IGNORE_INDEX,
                reduction="sum",
            )
        )
        tokens += int((targets != IGNORE_INDEX).sum())
    return (loss_sum / tokens if tokens else None), tokens


def generate(model, tokenizer, prompts: list[list[int]], cfg: RunConfig) -> list[str]:
    """Answers to token-id prompts, batched with left padding; special tokens dropped."""
    return [decode_answer(tokenizer, ids) for ids in generate_ids(model, tokenizer, prompts, cfg)]


@torch.no_grad()
def generate_ids(model, tokenizer, prompts: list[list[int]], cfg: RunConfig) -> list[list[int]]:
    """The generated token ids per prompt (eval.batch_size prompts per generate() call, left
    padded; greedy unless eval.do_sample), before decode_answer."""
    device = next(model.parameters()).device
    pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    options: dict = {"do_sample": cfg.eval.do_sample, "max_new_tokens": cfg.eval.max_new_tokens}
    if cfg.eval.do_sample:
        options["temperature"] = cfg.eval.temperature
        torch.manual_seed(cfg.train.seed)
    else:
        options.update(temperature=None, top_p=None, top_k=None)
    generated = []
    for start in range(0, len(prompts), cfg.eval.batch_size):
        batch = prompts[start : start + cfg.eval.batch_size]
        length = max(len(p) for p in batch)
        ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(batch):
            ids[i, length - len(p) :] = torch.as_tensor(p)
            mask[i, length - len(p) :] = 1
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            pad_token_id=pad_id,
            eos_token_id=eos_id,
            **options,
        )
        generated += out[:, length:].tolist()
    return generated


def decode_answer(tokenizer, ids: list[int]) -> str:
    """Generated token ids as the answer's text: up to the first EOS, special tokens dropped."""
    eos_id = tokenizer.eos_token_id
    if eos_id in ids:
        ids = ids[: ids.index(eos_id)]
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


def score_model(
    name: str,
    cfg: RunConfig,
    split,
    prompts: list[list[int]],
    tokenizer,
    tasks: tuple[list[harness.HarnessTask], object] | None = None,
) -> tuple[dict, list[str]]:
    """Loss, answers and (with `tasks`: resolve_tasks' result) lm-eval scores of one model.
    With eval.engine=vllm, vLLM generates first, in a process of its own that hands the GPU
    back before transformers loads the model for the loss."""
    device, dtype = _device_and_dtype()
    answers = None
    if cfg.eval.engine == "vllm":
        from .vllm_engine import generate_vllm

        started = time.monotonic()
        answers = [
            decode_answer(tokenizer, ids)
            for ids in generate_vllm(locate(name, cfg), cfg, prompts, tokenizer, dtype)
        ]
        generate_seconds = time.monotonic() - started
    model = load_model(name, cfg, dtype, device)
    started = time.monotonic()
    pairs: dict = {}
    if cfg.data.format == "preference":  # held-out pairs: each document scored on its own
        docs = documents(split)
        logps, counts = answer_logps(model, docs, cfg.eval.batch_size, tokenizer.pad_token_id)
        pairs = preference_scores(logps, counts)
        loss, tokens = pairs.pop("eval_loss"), pairs.pop("eval_tokens")
        pairs["_logps"] = logps
    else:
        loss, tokens = eval_loss(model, split, cfg.eval.batch_size, tokenizer.pad_token_id)
    loss_seconds = time.monotonic() - started
    if answers is None:
        started = time.monotonic()
        answers = generate(model, tokenizer, prompts, cfg)
        generate_seconds = time.monotonic() - started
    result: dict = {
        "model": name,
        "eval_loss": loss,
        "perplexity": math.exp(loss) if loss is not None and loss < 700 else None,
        "eval_tokens": tokens,
        "loss_seconds": round(loss_seconds, 3),
        "generate_seconds": round(generate_seconds, 3),
        "engine": cfg.eval.engine,
        **pairs,
    }
    if tasks is not None:
        started = time.monotonic()
        task_list, manager = tasks
        result["lm_eval"] = harness.score(model, tokenizer, task_list, manager, cfg)
        result["lm_eval_seconds"] = round(time.monotonic() - started, 3)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result, answers


def gate(cfg: RunConfig, tuned: dict, lm_eval_rows: list[dict] | None = None) -> dict:
    """Whether the tuned model clears eval.min_rouge_l / eval.max_eval_loss and, per lm-eval
    task, eval.max_regression (no bound: passes)."""
    checks: list[dict] = []
    if cfg.eval.min_rouge_l is not None:
        value = tuned["rougeL"]
        checks.append(
            {"metric": "rougeL", "op": ">=", "threshold": cfg.eval.min_rouge_l, "value": value}
        )
        checks[-1]["passed"] = value >= cfg.eval.min_rouge_l
    if cfg.eval.max_eval_loss is not None:
        value = tuned["eval_loss"]
        passed = value is not None and value <= cfg.eval.max_eval_loss
        checks.append(
            {
                "metric": "eval_loss",
                "op": "<=",
                "threshold": cfg.eval.max_eval_loss,
                "value": value,
                "passed": passed,
            }
        )
    checks += harness.regression_checks(cfg, list(lm_eval_rows or []))
    return {"passed": all(c["passed"] for c in checks), "checks": checks}


def load_eval_split(dataset_dir: str | Path):
    from datasets import load_from_disk

    path = Path(dataset_dir)
    if not (path / DATASET_DICT_FILE).is_file():
        raise UserError(f"{path}: not a `kubetune prepare` output (no {DATASET_DICT_FILE})")
    data = load_from_disk(str(path))
    if "eval" not in data or len(data["eval"]) == 0:
        raise UserError(f"{path}: has no eval split (set data.eval_fraction > 0 in prepare)")
    split = data["eval"]
    missing = {"input_ids", "labels", "prompt", "reference"} - set(split.column_names)
    if missing:
        raise UserError(f"{path}: the eval split lacks column(s) {', '.join(sorted(missing))}")
    return split


def find_training_metrics(model_dir: str, given: str | None) -> dict | None:
    """`--training-metrics FILE`, else training_metrics.json or metrics.json beside the model:
    the first that holds a loss history."""
    if given and not Path(given).is_file():
        raise UserError(f"{given}: no such file")
    path = Path(model_dir)
    candidates = [Path(given)] if given else []
    for candidate in [*candidates, path / TRAINING_METRICS_FILE, path / METRICS_FILE]:
        if not candidate.is_file():
            continue
        try:
            data = json.loads(candidate.read_text())
        except ValueError:
            raise UserError(f"{candidate}: not valid JSON") from None
        if isinstance(data, dict) and "loss" in data:
            return data
    return None


def side_by_side(head, references: list, tuned: list, base: list | None) -> list[dict]:
    """generations.jsonl: each prompt with its reference and the answers, scored."""
    generations = []
    for i, reference in enumerate(references):
        item = {
            "index": i,
            "prompt": head[i]["prompt"],
            "reference": reference,
            "tuned": tuned[i],
            "tuned_scores": per_example(tuned[i], reference),
        }
        if base is not None:
            item["baseline"] = base[i]
            item["baseline_scores"] = per_example(base[i], reference)
        generations.append(item)
    return generations


def evaluate(
    cfg: RunConfig,
    model_dir: str,
    dataset_dir: str | Path,
    output_dir: str | Path,
    baseline: str | None = None,
    training_metrics: str | None = None,
    overwrite: bool = False,
) -> dict:
    """Evaluate model_dir (and baseline) on the eval split; write metrics.json,
    generations.jsonl and report.html to output_dir; return the metrics."""
    output = Path(output_dir)
    check_output(output, overwrite)
    split = load_eval_split(dataset_dir)
    if (Path(dataset_dir) / STATS_FILE).is_file():
        check_data_matches_model(cfg.model, dataset_dir)
    training = find_training_metrics(model_dir, training_metrics)
    if cfg.eval.engine == "vllm":
        from .vllm_engine import check_available

        check_available()
    # the forgetting check: tasks resolved before any model loads; it needs the base model
    tasks = harness.resolve_tasks(cfg.eval.lm_eval_tasks) if cfg.eval.lm_eval_tasks else None
    if tasks is not None and baseline is None:
        baseline = cfg.model.name_or_path
    tokenizer = load_tokenizer(cfg.model)
    n = min(cfg.eval.num_prompts, len(split))
    head = split.select(range(n))
    prompts = [prompt_ids(row) for row in head]
    references = list(head["reference"])

    tuned, tuned_answers = score_model(model_dir, cfg, split, prompts, tokenizer, tasks)
    tuned.update(score_texts(tuned_answers, references))
    tuned_logps = tuned.pop("_logps", None)
    base, base_answers = None, None
    if baseline is not None:
        base, base_answers = score_model(baseline, cfg, split, prompts, tokenizer, tasks)
        base.update(score_texts(base_answers, references))
        base_logps = base.pop("_logps", None)
        if tuned_logps is not None and base_logps is not None:
            tuned["reward_accuracy"] = reward_accuracy(tuned_logps, base_logps)
    rows = harness.side_by_side(base["lm_eval"], tuned["lm_eval"]) if base and tasks else []
    metrics: dict = {
        "num_prompts": n,
        "eval_rows": len(split),
        "max_new_tokens": cfg.eval.max_new_tokens,
        "do_sample": cfg.eval.do_sample,
        "tuned": tuned,
        "baseline": base,
        "gate": gate(cfg, tuned, rows),
    }
    if tasks is not None:
        metrics["lm_eval"] = {
            "limit": cfg.eval.lm_eval_limit,
            "num_fewshot": cfg.eval.lm_eval_num_fewshot,
            "tasks": rows,
        }
    if base is not None:
        metrics["improvement"] = {
            k: tuned[k] - base[k] for k in ("rouge1", "rouge2", "rougeL", "exact_match")
        }
        if tuned.get("preference_accuracy") is not None:
            metrics["improvement"]["preference_accuracy"] = (
                tuned["preference_accuracy"] - base["preference_accuracy"]
            )
        if tuned["eval_loss"] is not None and base["eval_loss"] is not None:
            metrics["improvement"]["eval_loss"] = base["eval_loss"] - tuned["eval_loss"]
    generations = side_by_side(head, references, tuned_answers, base_answers)
    with staged_output(output, overwrite) as staging:
        with open(staging / "generations.jsonl", "w", encoding="utf-8") as f:
            for item in generations:
                f.write(json.dumps(item, ensure_ascii=False) + "\n")
        (staging / "report.html").write_text(
            render_report(cfg, metrics, generations, training), encoding="utf-8"
        )
        write_resolved(cfg, staging)
        write_json(staging / METRICS_FILE, metrics)
    return metrics


def kfp_metrics(metrics: dict) -> dict[str, float]:
    """Flat numbers for a KFP Metrics artifact: tuned_*, baseline_*, gate_passed."""
    flat = {}
    for side in ("tuned", "baseline"):
        if metrics.get(side):
            for key in (
                "eval_loss", "perplexity", "rouge1", "rouge2", "rougeL", "exact_match",
                "preference_accuracy", "reward_accuracy",
            ):  # fmt: skip
                if metrics[side].get(key) is not None:
                    flat[f"{side}_{key}"] = float(metrics[side][key])
    for row in (metrics.get("lm_eval") or {}).get("tasks", []):
        for side in ("base", "tuned"):
            flat[f"lm_eval_{row['task']}_{side}"] = float(row[side])
    flat["gate_passed"] = float(metrics["gate"]["passed"])
    return flat
