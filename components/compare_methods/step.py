"""compare_methods: the last step of `kubetune compare`: the methods side by side.

Each branch of the comparison pipeline trained, merged and evaluated one method under
RUN_DIR/methods/METHOD (train/, model/, eval/). This step reads what those steps wrote
(train/metrics.json, eval/metrics.json, eval/generations.jsonl) and writes, into
RUN_DIR/comparison/:

- comparison.json: per method, trainable parameters, training seconds, tokens/s, peak memory,
  eval loss, ROUGE-L; the base model's eval loss and ROUGE-L; and, for Falcon-7B, the published
  trainable-parameter counts of lit-parrot's comparison beside kubetune's;
- comparison.md: the same table as Markdown (the KFP UI shows it);
- report.html: the table and the first answers of every method side by side.
"""

from __future__ import annotations

import json
from html import escape
from pathlib import Path

from ..artifacts import METRICS_FILE
from ..errors import UserError
from ..evaluate.report import STYLE

# lit-parrot's LoRA/adapter comparison on Falcon-7B (Alpaca): trainable parameters as published.
# Its LoRA is r=8 on the query and value parts of the fused query_key_value; peft's LoRA on the
# whole fused layer (kubetune's lora.target_modules=[query_key_value], r=8) trains 2,359,296.
PUBLISHED_FALCON_7B = {
    "full": 7_217_189_760,
    "adapter": 1_365_330,
    "adapter_v2": 3_839_186,
    "lora": 3_506_176,
}
FALCON_7B = "tiiuae/falcon-7b"
ANSWERS = 3  # prompts shown side by side in the report
COLUMNS = (
    ("lr", "lr", "{:.3g}"),
    ("trainable_params", "trainable params", "{:,}"),
    ("train_seconds", "train s", "{:.1f}"),
    ("tokens_per_second", "tokens/s", "{:,.0f}"),
    ("peak_memory_gb", "peak mem GB", "{:.2f}"),
    ("eval_loss", "eval loss", "{:.4f}"),
    ("rougeL", "ROUGE-L", "{:.4f}"),
)


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: cannot read the branch's results ({exc})") from None


def branch_row(eval_dir: Path) -> tuple[dict, dict, list[dict]]:
    """(the method's row, the base model's eval metrics, its generations) of one branch."""
    branch = eval_dir.parent
    training = _read(branch / "train" / METRICS_FILE)
    evaluation = _read(eval_dir / METRICS_FILE)
    tuned = evaluation["tuned"]
    generations = [
        json.loads(line)
        for line in (eval_dir / "generations.jsonl").read_text().splitlines()
        if line.strip()
    ]
    settings_file = branch / "settings.json"
    settings = _read(settings_file) if settings_file.is_file() else {}
    row = {
        "method": training["method"],
        "lr": settings.get("lr"),
        "settings": settings.get("settings") or {},
        "trainable_params": training["trainable_params"],
        "total_params": training["total_params"],
        "train_seconds": training.get("train_seconds"),
        "tokens_per_second": training.get("steady_tokens_per_second")
        or training.get("tokens_per_second"),
        "peak_memory_gb": training["peak_memory_bytes"] / 1e9,
        "device": training.get("device"),
        "eval_loss": tuned["eval_loss"],
        "rougeL": tuned["rougeL"],
    }
    return row, evaluation.get("baseline") or {}, generations


def _cell(value, fmt: str) -> str:
    return "–" if value is None else fmt.format(value)


def settings_text(row: dict) -> str:
    """What the branch changed from the recipe, and where each value came from."""
    items = [f"{k}={v['value']} ({v['from']})" for k, v in (row.get("settings") or {}).items()]
    return "; ".join(items) or "the recipe's own"


def markdown_table(rows: list[dict], base: dict, published: dict | None) -> str:
    heads = ["method"] + [title for _, title, _ in COLUMNS]
    if published:
        heads.append("published params")
    heads.append("settings")
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for row in rows:
        cells = [row["method"]] + [_cell(row.get(k), fmt) for k, _, fmt in COLUMNS]
        if published:
            cells.append(_cell(published.get(row["method"]), "{:,}"))
        cells.append(settings_text(row))
        lines.append("| " + " | ".join(cells) + " |")
    if base:
        cells = ["base (untrained)"] + [
            _cell(base.get(k), fmt) if k in ("eval_loss", "rougeL") else "" for k, _, fmt in COLUMNS
        ]
        lines.append("| " + " | ".join(cells + ([""] if published else []) + [""]) + " |")
    return "\n".join(lines) + "\n"


def html_report(model: str, rows, base, published, answers) -> str:
    heads = ["method"] + [title for _, title, _ in COLUMNS]
    if published:
        heads.append("published params (lit-parrot, Falcon-7B)")
    heads.append("settings")
    body = ["<tr>" + "".join(f"<th>{escape(h)}</th>" for h in heads) + "</tr>"]
    for row in rows:
        cells = [f"<td>{escape(row['method'])}</td>"]
        cells += [f'<td class="num">{_cell(row.get(k), fmt)}</td>' for k, _, fmt in COLUMNS]
        if published:
            cells.append(f'<td class="num">{_cell(published.get(row["method"]), "{:,}")}</td>')
        cells.append(f"<td>{escape(settings_text(row))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    if base:
        cells = ["<td>base (untrained)</td>"] + [
            f'<td class="num">{_cell(base.get(k), fmt)}</td>'
            if k in ("eval_loss", "rougeL")
            else "<td></td>"
            for k, _, fmt in COLUMNS
        ]
        body.append("<tr>" + "".join(cells) + ("<td></td>" if published else "") + "<td></td></tr>")
    answer_rows = []
    methods = [row["method"] for row in rows]
    for item in answers:
        cells = [f"<td><pre>{escape(item['prompt'])}</pre></td>"]
        cells.append(f"<td><pre>{escape(item['reference'])}</pre></td>")
        cells += [f"<td><pre>{escape(item['answers'].get(m, ''))}</pre></td>" for m in methods]
        answer_rows.append("<tr>" + "".join(cells) + "</tr>")
    answer_head = "".join(f"<th>{escape(h)}</th>" for h in ["prompt", "reference", *methods])
    return (
        "<!doctype html>\n<html><head><meta charset='utf-8'>"
        f"<title>kubetune: methods compared on {escape(model)}</title>"
        f"<style>{STYLE}</style></head><body>\n"
        f"<h1>Methods compared on {escape(model)}</h1>\n"
        "<p>Same prepared data and evaluation; each method trains with the settings it is "
        "known to need (the settings column: what differs from the recipe, and where it came "
        "from: published defaults, the recipe's <code>compare</code> section, the command "
        "line). Training time, "
        "tokens/s and peak memory come from each branch's training run (peak memory: GPU "
        "memory on CUDA, the process's peak RSS on CPU).</p>\n"
        f"<table>{''.join(body)}</table>\n<h2>Answers side by side</h2>\n"
        f"<table><tr>{answer_head}</tr>{''.join(answer_rows)}</table>\n</body></html>\n"
    )


def compare(model: str, eval_dirs: list[str], output_dir: str | Path) -> dict:
    """Read every branch, write comparison.json, comparison.md and report.html."""
    if not eval_dirs:
        raise UserError("compare: no branch finished (no evaluation folders)")
    rows: list[dict] = []
    base: dict = {}
    answers: dict = {}
    for eval_dir in eval_dirs:
        row, baseline, generations = branch_row(Path(eval_dir))
        rows.append(row)
        base = base or baseline
        for item in generations[:ANSWERS]:
            entry = answers.setdefault(
                item["index"],
                {"prompt": item["prompt"], "reference": item["reference"], "answers": {}},
            )
            entry["answers"][row["method"]] = item["tuned"]
    order = {m: i for i, m in enumerate(("full", "lora", "qlora", "adapter", "adapter_v2"))}
    rows.sort(key=lambda r: order.get(r["method"], len(order)))
    published = PUBLISHED_FALCON_7B if model == FALCON_7B else None
    result = {
        "model": model,
        "methods": rows,
        "base": {k: base.get(k) for k in ("eval_loss", "rougeL")} if base else None,
        "published_trainable_params": published,
    }
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(rows, base, published)
    (out / "comparison.md").write_text(table)
    shown = [answers[k] for k in sorted(answers)]
    (out / "report.html").write_text(html_report(model, rows, base, published, shown))
    (out / "comparison.json").write_text(json.dumps(result, indent=1) + "\n")  # last: complete
    return result
