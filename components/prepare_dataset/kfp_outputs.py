"""What the prepare_dataset KFP component shows in the KFP UI: Metrics and a Markdown summary."""

from __future__ import annotations


def stats_metrics(stats: dict) -> dict[str, float]:
    """The numbers of stats.json that a KFP Metrics artifact logs (flat, numeric)."""
    metrics = {
        "rows_read": stats["rows_read"],
        "rows_kept": stats["rows_kept"],
        "rows_dropped": stats["rows_dropped_total"],
        "truncated_rows": stats["truncated_rows"],
        "tokens_total": stats["tokens"]["total"],
        "tokens_train": stats["tokens"]["train"],
        "train_rows": stats["splits"]["train"],
        "eval_rows": stats["splits"]["eval"],
        "packing_efficiency": stats["packing"]["efficiency"],
    }
    for reason, count in stats["rows_dropped"].items():
        metrics[f"dropped_{reason.replace(':', '_')}"] = count
    return {k: float(v) for k, v in metrics.items()}


def stats_markdown(stats: dict) -> str:
    lines = [
        f"# Dataset: {stats['source']} ({stats['format']})",
        "",
        f"Tokenizer of `{stats['model']}`, rows of at most {stats['max_seq_len']} tokens "
        f"(overlength policy: {stats['overlength_policy']}).",
        "",
        "| | value |",
        "| --- | --- |",
        f"| rows read | {stats['rows_read']} |",
        f"| rows kept | {stats['rows_kept']} |",
        f"| rows truncated | {stats['truncated_rows']} |",
    ]
    lines += [f"| dropped: {reason} | {count} |" for reason, count in stats["rows_dropped"].items()]
    lines += [
        f"| train rows / examples | {stats['splits']['train']} / {stats['examples']['train']} |",
        f"| eval rows | {stats['splits']['eval']} |",
        f"| tokens (train / eval) | {stats['tokens']['train']} / {stats['tokens']['eval']} |",
        f"| response tokens (in the loss) | {stats['tokens']['response']} |",
        f"| example length min / mean / max | {stats['example_length']['min']} / "
        f"{stats['example_length']['mean']} / {stats['example_length']['max']} |",
        f"| packing | {'on' if stats['packing']['enabled'] else 'off'}, efficiency "
        f"{stats['packing']['efficiency']:.1%} |",
        f"| fingerprint | `{stats['fingerprint'][:16]}` |",
    ]
    return "\n".join(lines) + "\n"


def report_to_kfp(stats: dict, metrics, summary_path: str) -> None:
    """Log stats on a KFP `Output[Metrics]` and write the Markdown summary."""
    for name, value in stats_metrics(stats).items():
        metrics.log_metric(name, value)
    with open(summary_path, "w", encoding="utf-8") as f:
        f.write(stats_markdown(stats))
