"""The `kubetune` command line.

User errors (`UserError`: bad recipe, bad data, missing files, no credentials) print one or two
lines and exit with code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from kubetune.components import __version__
from kubetune.components.config import RECIPES_DIR, dump_config, load_recipe
from kubetune.components.console import quiet_progress_off_terminal
from kubetune.components.errors import UserError


def _recipe_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe YAML (a path, or the name of a shipped recipe)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one field, e.g. --set data.max_seq_len=1024 (repeatable)",
    )


def cmd_version(args) -> int:
    print(f"kubetune {__version__}")
    return 0


def cmd_recipes(args) -> int:
    for path in sorted(RECIPES_DIR.glob("*.yaml")):
        print(path.stem)
    return 0


def cmd_config(args) -> int:
    cfg = load_recipe(args.recipe, args.overrides)
    sys.stdout.write(dump_config(cfg))
    return 0


def cmd_prepare(args) -> int:
    from kubetune.components.prepare_dataset import prepare_dataset

    cfg = load_recipe(args.recipe, args.overrides)
    stats = prepare_dataset(cfg, args.output, overwrite=args.overwrite)
    dropped = ", ".join(f"{k} {v}" for k, v in stats["rows_dropped"].items()) or "none"
    print(
        f"read {stats['rows_read']} rows, kept {stats['rows_kept']} (dropped: {dropped}; "
        f"truncated {stats['truncated_rows']})"
    )
    print(
        f"train {stats['splits']['train']} rows / eval {stats['splits']['eval']} rows, "
        f"{stats['tokens']['total']} tokens, packing efficiency {stats['packing']['efficiency']}"
    )
    print(f"wrote {Path(args.output)} (stats in {Path(args.output) / 'stats.json'})")
    return 0


def cmd_train(args) -> int:
    from kubetune.components.train.launcher import train

    cfg = load_recipe(args.recipe, args.overrides)
    return train(cfg, args.dataset, args.output)


def cmd_merge(args) -> int:
    from kubetune.components.merge_adapter import merge_adapter

    cfg = load_recipe(args.recipe, args.overrides)
    summary = merge_adapter(cfg, args.adapter, args.output, overwrite=args.overwrite)
    print(
        f"merged {summary['merged_weights']} weights in {summary['shards']} shard(s) "
        f"(scale {summary['scale']:g}) into {args.output}"
    )
    return 0


def cmd_plan(args) -> int:
    from kubetune.components.train.plan import estimate, render

    cfg = load_recipe(args.recipe, args.overrides)
    plan = estimate(cfg)
    print(json.dumps(plan.as_dict(), indent=1) if args.json else render(plan, cfg), end="")
    return 0


def cmd_tiny(args) -> int:
    import shutil

    from kubetune.components.tiny_models import tiny_model_dir

    source = tiny_model_dir(f"tiny://{args.arch}")
    if args.output:
        shutil.copytree(source, args.output, dirs_exist_ok=False)
        source = Path(args.output)
    print(json.dumps({"arch": args.arch, "path": str(source)}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kubetune",
        description="Fine-tune open LLMs (QLoRA, LoRA, full) as Kubeflow Pipelines steps.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("version", help="print the kubetune version")
    p.set_defaults(func=cmd_version)

    p = sub.add_parser("recipes", help="list the shipped recipes")
    p.set_defaults(func=cmd_recipes)

    p = sub.add_parser(
        "config", help="print a recipe's resolved config (defaults and --set applied)"
    )
    _recipe_args(p)
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("prepare", help="tokenize, mask and pack a dataset for training")
    _recipe_args(p)
    p.add_argument("--output", required=True, help="folder for the DatasetDict and stats.json")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser(
        "train",
        help="fine-tune (torchrun here, or a PyTorchJob); resumes if OUTPUT has checkpoints",
    )
    _recipe_args(p)
    p.add_argument("--dataset", required=True, help="a `kubetune prepare` output folder")
    p.add_argument(
        "--output", required=True, help="folder for the adapter/weights, checkpoints and metrics"
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "plan", help="predict peak GPU memory per GPU and whether it fits hardware.gpu"
    )
    _recipe_args(p)
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("merge", help="fold a LoRA adapter into the base weights, shard by shard")
    _recipe_args(p)
    p.add_argument("--adapter", required=True, help="a `kubetune train` LoRA/QLoRA output folder")
    p.add_argument("--output", required=True, help="folder for the merged model")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("tiny", help="build a tiny://ARCH model (random weights, no download)")
    p.add_argument("arch", help="falcon, falcon-40b, llama, mistral or qwen2")
    p.add_argument("--output", help="copy it to this folder (default: print the cache folder)")
    p.set_defaults(func=cmd_tiny)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command not in ("version", "recipes"):
        quiet_progress_off_terminal()
    try:
        return args.func(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
