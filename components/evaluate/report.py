"""report.html: one self-contained page (no scripts, no external files) that the KFP UI shows as
an HTML artifact: the metrics table, the training loss curve, and every prompt with its
reference and the base and tuned answers side by side."""

from __future__ import annotations

from html import escape
from typing import TYPE_CHECKING

from .. import __version__

if TYPE_CHECKING:
    from ..config import RunConfig

ROWS = (
    ("eval_loss", "eval loss", "lower"),
    ("perplexity", "perplexity", "lower"),
    ("rouge1", "ROUGE-1", "higher"),
    ("rouge2", "ROUGE-2", "higher"),
    ("rougeL", "ROUGE-L", "higher"),
    ("exact_match", "exact match", "higher"),
    # preference data only (rows left out when neither model has them)
    ("preference_accuracy", "preference accuracy (held-out pairs)", "higher"),
    ("reward_accuracy", "reward accuracy (base as reference)", "higher"),
)
OPTIONAL = {"preference_accuracy", "reward_accuracy"}

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 0.35em 0.6em; vertical-align: top; text-align: left; }
th { background: #f3f3f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.better { color: #0a7d28; font-weight: 600; }
.worse { color: #b3261e; }
.pass { color: #0a7d28; font-weight: 600; }
.fail { color: #b3261e; font-weight: 600; }
pre { white-space: pre-wrap; margin: 0; font-size: 0.9em; max-width: 40em; }
"""


def _num(value) -> str:
    if value is None:
        return "–"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def loss_curve_svg(training: dict, width: int = 640, height: int = 260) -> str:
    """The training loss history (and final eval loss) as an inline SVG line chart."""
    # a skipped step's loss is null (train.nonfinite: skip, a spike's rollback)
    points = [(float(s), float(v)) for s, v in training.get("loss", []) if v is not None]
    if len(points) < 2:
        return "<p>Too few logged steps for a loss curve.</p>"
    eval_loss = training.get("eval_loss")
    values = [v for _, v in points] + ([eval_loss] if eval_loss is not None else [])
    lo, hi = min(values), max(values)
    hi = hi if hi > lo else lo + 1.0
    x0, x1 = points[0][0], points[-1][0]
    x1 = x1 if x1 > x0 else x0 + 1.0
    pad_l, pad_r, pad_t, pad_b = 56, 16, 16, 36

    def x(step: float) -> float:
        return pad_l + (step - x0) / (x1 - x0) * (width - pad_l - pad_r)

    def y(value: float) -> float:
        return pad_t + (hi - value) / (hi - lo) * (height - pad_t - pad_b)

    line = " ".join(f"{x(s):.1f},{y(v):.1f}" for s, v in points)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'role="img" aria-label="training loss by step">',
        f'<rect x="{pad_l}" y="{pad_t}" width="{width - pad_l - pad_r}" '
        f'height="{height - pad_t - pad_b}" fill="none" stroke="#ccc"/>',
        f'<polyline points="{line}" fill="none" stroke="#1a73e8" stroke-width="2"/>',
        f'<text x="{pad_l - 6}" y="{y(hi) + 4:.1f}" text-anchor="end" font-size="11">{hi:.3f}</text>',
        f'<text x="{pad_l - 6}" y="{y(lo) + 4:.1f}" text-anchor="end" font-size="11">{lo:.3f}</text>',
        f'<text x="{x(x0):.1f}" y="{height - 18}" text-anchor="middle" font-size="11">{x0:g}</text>',
        f'<text x="{x(x1):.1f}" y="{height - 18}" text-anchor="middle" font-size="11">{x1:g}</text>',
        f'<text x="{width / 2:.0f}" y="{height - 4}" text-anchor="middle" font-size="12">'
        "optimizer step</text>",
    ]
    if eval_loss is not None:
        parts.append(
            f'<circle cx="{x(x1):.1f}" cy="{y(eval_loss):.1f}" r="5" fill="#e8710a">'
            f"<title>eval loss {eval_loss:.4f}</title></circle>"
        )
    parts.append("</svg>")
    legend = '<p><span style="color:#1a73e8">&#9632;</span> training loss'
    if eval_loss is not None:
        legend += f' &nbsp; <span style="color:#e8710a">&#9679;</span> eval loss {eval_loss:.4f}'
    return "".join(parts) + legend + "</p>"


def _metrics_table(metrics: dict) -> str:
    tuned, base = metrics["tuned"], metrics.get("baseline")
    head = "<tr><th>metric</th>" + ("<th>base</th>" if base else "") + "<th>tuned</th></tr>"
    rows = [head]
    for key, label, better in ROWS:
        if key in OPTIONAL and tuned.get(key) is None and not (base and base.get(key) is not None):
            continue
        cells = f"<td>{label}</td>"
        css = ""
        if base and tuned.get(key) is not None and base.get(key) is not None:
            gain = tuned[key] - base[key] if better == "higher" else base[key] - tuned[key]
            css = "better" if gain > 0 else "worse" if gain < 0 else ""
            cells += f'<td class="num">{_num(base[key])}</td>'
        elif base:
            cells += f'<td class="num">{_num(base.get(key))}</td>'
        cells += f'<td class="num {css}">{_num(tuned.get(key))}</td>'
        rows.append(f"<tr>{cells}</tr>")
    return "<table>" + "".join(rows) + "</table>"


def _lm_eval(metrics: dict) -> str:
    """The forgetting check's tasks, base and tuned side by side."""
    section = metrics.get("lm_eval")
    if not section:
        return ""
    rows = [
        "<tr><th>task</th><th>metric</th><th>documents</th><th>base</th><th>tuned</th>"
        "<th>change</th></tr>"
    ]
    for r in section["tasks"]:
        css = "better" if r["regression"] < 0 else "worse" if r["regression"] > 0 else ""

        def cell(value, stderr):
            spread = f" &plusmn; {stderr:.4f}" if stderr is not None else ""
            return f"{value:.4f}{spread}"

        rows.append(
            f"<tr><td>{escape(r['task'])}</td><td>{escape(r['metric'])}"
            f"{'' if r['higher_is_better'] else ' (lower is better)'}</td>"
            f'<td class="num">{_num(r["samples"])}</td>'
            f'<td class="num">{cell(r["base"], r["base_stderr"])}</td>'
            f'<td class="num {css}">{cell(r["tuned"], r["tuned_stderr"])}</td>'
            f'<td class="num {css}">{r["change"]:+.4f}</td></tr>'
        )
    shots = section.get("num_fewshot")
    limit = section.get("limit")
    note = (
        f"<p>lm-evaluation-harness; {'the tasks’ own few-shot' if shots is None else shots}"
        f"{'' if shots is None else '-shot'}, "
        f"{'every document' if limit is None else f'at most {limit} documents per task'}.</p>"
    )
    return "<h2>Forgetting check</h2>" + note + "<table>" + "".join(rows) + "</table>"


def _gate(metrics: dict) -> str:
    gate = metrics["gate"]
    if not gate["checks"]:
        return "<p>No quality gate set (eval.min_rouge_l, eval.max_eval_loss, eval.max_regression).</p>"
    items = "".join(
        f"<li>{escape(c['metric'])} {escape(c['op'])} {c['threshold']}: {_num(c['value'])} "
        f'<span class="{"pass" if c["passed"] else "fail"}">'
        f"{'passed' if c['passed'] else 'failed'}</span></li>"
        for c in gate["checks"]
    )
    verdict = "pass" if gate["passed"] else "fail"
    return f'<p>Quality gate: <span class="{verdict}">{verdict}ed</span></p><ul>{items}</ul>'


def render_report(
    cfg: RunConfig, metrics: dict, generations: list[dict], training: dict | None
) -> str:
    base = metrics.get("baseline")
    title = f"kubetune evaluation: {cfg.model.name_or_path} ({cfg.method})"
    body = [
        f"<h1>{escape(title)}</h1>",
        f"<p>Tuned model: <code>{escape(str(metrics['tuned']['model']))}</code>"
        + (f"<br>Base model: <code>{escape(str(base['model']))}</code>" if base else "")
        + f"<br>{metrics['num_prompts']} prompts, {metrics['eval_rows']} eval rows, "
        f"{'sampled' if metrics['do_sample'] else 'greedy'} decoding, at most "
        f"{metrics['max_new_tokens']} new tokens. kubetune {escape(__version__)}.</p>",
        "<h2>Metrics</h2>",
        _metrics_table(metrics),
        _lm_eval(metrics),
        _gate(metrics),
    ]
    if training:
        body += ["<h2>Training loss</h2>", loss_curve_svg(training)]
    if training and training.get("eval_metrics"):  # a preference objective's last evaluation
        cells = "".join(
            f'<tr><td>{escape(k)}</td><td class="num">{_num(v)}</td></tr>'
            for k, v in training["eval_metrics"].items()
        )
        body += [
            f"<h2>Training's last evaluation ({escape(str(training.get('objective')))})</h2>",
            f"<table><tr><th>metric</th><th>eval split</th></tr>{cells}</table>",
        ]
    body.append("<h2>Generations</h2>")
    head = "<tr><th>#</th><th>prompt</th><th>reference</th>"
    head += ("<th>base</th>" if base else "") + "<th>tuned</th></tr>"
    rows = [head]
    for g in generations:
        cells = (
            f"<td>{g['index']}</td><td><pre>{escape(g['prompt'])}</pre></td>"
            f"<td><pre>{escape(g['reference'])}</pre></td>"
        )
        if base:
            cells += (
                f"<td><pre>{escape(g['baseline'])}</pre>"
                f"<small>ROUGE-L {g['baseline_scores']['rougeL']:.3f}</small></td>"
            )
        cells += (
            f"<td><pre>{escape(g['tuned'])}</pre>"
            f"<small>ROUGE-L {g['tuned_scores']['rougeL']:.3f}</small></td>"
        )
        rows.append(f"<tr>{cells}</tr>")
    body.append("<table>" + "".join(rows) + "</table>")
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{escape(title)}</title><style>{STYLE}</style></head><body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )
