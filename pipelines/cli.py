"""The `kubetune` command line.

User errors (`UserError`: bad recipe, bad data, missing files, no credentials) and storage faults
(a full disk, a read-only path) print one line and exit with code 2, with any secret of the
environment masked; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys

from kubetune.components.console import quiet_progress_off_terminal
from kubetune.components.errors import UserError
from kubetune.components.outputs import storage_cause
from kubetune.components.secrets import redact
from kubetune.pipelines.commands import (
    cmd_compare,
    cmd_compile,
    cmd_config,
    cmd_deploy,
    cmd_evaluate,
    cmd_fetch_model,
    cmd_merge,
    cmd_plan,
    cmd_prepare,
    cmd_pull,
    cmd_push,
    cmd_recipes,
    cmd_render_job,
    cmd_render_serve,
    cmd_run,
    cmd_submit,
    cmd_tiny,
    cmd_train,
    cmd_version,
    write_stdout,
)


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


VERBOSE_HELP = (
    "print KFP's executor logs and every step's output as they come (always in RUN/kfp-local.log)"
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kubetune",
        description="Fine-tune open LLMs (QLoRA, LoRA, LLaMA-Adapter, full) as Kubeflow Pipelines steps.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    _step_commands(sub)
    _pipeline_commands(sub)
    _cluster_commands(sub)
    _model_commands(sub)
    _storage_commands(sub)
    return parser


def _step_commands(sub) -> None:
    """version, recipes, config, and the steps before training: fetch-model, prepare, train."""
    p = sub.add_parser("version", help="print the kubetune version")
    p.set_defaults(func=cmd_version)

    p = sub.add_parser("recipes", help="list the shipped recipes")
    p.set_defaults(func=cmd_recipes)

    p = sub.add_parser(
        "config", help="print a recipe's resolved config (defaults and --set applied)"
    )
    _recipe_args(p)
    p.set_defaults(func=cmd_config)

    p = sub.add_parser(
        "fetch-model",
        help="download a hub or s3:// model once per revision into WORKSPACE/models",
    )
    _recipe_args(p)
    p.add_argument(
        "--workspace",
        default="kubetune-work",
        help="folder whose models/ holds the copies (default: ./kubetune-work)",
    )
    p.set_defaults(func=cmd_fetch_model)

    p = sub.add_parser("prepare", help="tokenize, mask and pack a dataset for training")
    _recipe_args(p)
    p.add_argument("--output", required=True, help="folder for the DatasetDict and stats.json")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser(
        "train",
        help="fine-tune (torchrun here, a PyTorchJob or a TrainJob); resumes if OUTPUT has "
        "checkpoints",
    )
    _recipe_args(p)
    p.add_argument("--dataset", required=True, help="a `kubetune prepare` output folder")
    p.add_argument(
        "--output", required=True, help="folder for the adapter/weights, checkpoints and metrics"
    )
    p.set_defaults(func=cmd_train)


def _pipeline_commands(sub) -> None:
    """The whole pipeline: compile, run, compare, submit."""
    p = sub.add_parser("compile", help="compile the recipe's KFP pipeline to IR YAML")
    _recipe_args(p)
    p.add_argument("--output", required=True, help="pipeline YAML to write (upload in the KFP UI)")
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser(
        "run", help="run the whole pipeline on this machine with KFP's local runner (--local)"
    )
    _recipe_args(p)
    p.add_argument("--local", action="store_true", help="use kfp.local (subprocess runner)")
    p.add_argument(
        "--workspace",
        default="kubetune-work",
        help="folder for run folders (default: ./kubetune-work)",
    )
    p.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "compare",
        help="train, merge and evaluate several methods on the same data; one table and report",
    )
    _recipe_args(p)
    p.add_argument(
        "--methods",
        required=True,
        help="comma-separated methods, each with its own KEY=VALUE settings if needed, e.g. "
        "lora,adapter:train.lr=9e-3,adapter.start_layer=0,full (over the published defaults "
        "and the recipe's compare section)",
    )
    p.add_argument("--local", action="store_true", help="run it here with kfp.local")
    p.add_argument("--output", help="without --local: write the pipeline YAML here")
    p.add_argument(
        "--workspace",
        default="kubetune-work",
        help="with --local: folder for run folders (default: ./kubetune-work)",
    )
    p.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser(
        "submit", help="create a run, or a recurring run (--schedule), on a KFP endpoint"
    )
    _recipe_args(p)
    p.add_argument("--host", required=True, help="KFP API endpoint, e.g. https://kfp.example.com")
    p.add_argument("--experiment", default="kubetune", help="experiment name (created if missing)")
    p.add_argument("--schedule", help="cron expression (6 fields, KFP's format): a recurring run")
    p.add_argument("--run-name", help="run name (default: kubetune-<recipe model>-<time>)")
    p.add_argument("--namespace", help="KFP namespace (multi-user Kubeflow)")
    p.set_defaults(func=cmd_submit)


def _cluster_commands(sub) -> None:
    """Kubernetes objects and the plan: render-job, render-serve, deploy, plan."""
    p = sub.add_parser(
        "render-job",
        help="print the PyTorchJob or TrainJob YAML of a recipe (pipe it to kubectl apply -f -)",
    )
    _recipe_args(p)
    p.add_argument(
        "--kind",
        choices=("pytorchjob", "trainjob", "runtime"),
        help="pytorchjob (Training Operator v1), trainjob (Trainer v2), or runtime: the "
        "ClusterTrainingRuntime the TrainJob refers to (default: the recipe's "
        "distributed.backend; pytorchjob for local)",
    )
    p.add_argument("--name", help="job name (default: derived from the recipe and paths)")
    p.add_argument(
        "--dataset", help="prepared dataset inside the pods (default: WORKSPACE/runs/NAME/dataset)"
    )
    p.add_argument("--output", help="training output inside the pods (default: .../NAME/train)")
    p.set_defaults(func=cmd_render_job)

    for command, func, text in (
        ("render-serve", cmd_render_serve, "print the KServe InferenceService that serves a "
         "pushed model (kubectl apply -f -)"),
        ("deploy", cmd_deploy, "apply a pushed model's InferenceService, wait until Ready, ask "
         "it one question"),
    ):  # fmt: skip
        p = sub.add_parser(command, help=text)
        _recipe_args(p)
        p.add_argument(
            "--uri", required=True, help="the pushed model: output.uri of its run (s3://...)"
        )
        p.add_argument(
            "--name", help="InferenceService name (default: serve.name or kt-MODEL-METHOD)"
        )
        p.set_defaults(func=func)

    p = sub.add_parser(
        "plan",
        help="predict peak GPU memory per GPU and whether it fits, step time, tokens/s, wall "
        "time, GPU-hours and cost per GPU type",
    )
    _recipe_args(p)
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument(
        "--dataset", help="a prepared dataset (its stats.json gives the rows and their lengths)"
    )
    p.add_argument(
        "--gpus",
        help="GPU types to compare, each optionally with a count: A100-80GB,8xH100-80GB,L40S "
        "(default: hardware.gpu, else A100-80GB, H100-80GB, H200-141GB, L40S-48GB)",
    )
    p.set_defaults(func=cmd_plan)


def _model_commands(sub) -> None:
    """After training: merge, evaluate."""
    p = sub.add_parser(
        "merge", help="fold a LoRA or LLaMA-Adapter adapter into the base weights, shard by shard"
    )
    _recipe_args(p)
    p.add_argument("--adapter", required=True, help="a `kubetune train` adapter output folder")
    p.add_argument("--output", required=True, help="folder for the merged model")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser(
        "evaluate", help="generate for held-out prompts; loss, ROUGE, exact match; report.html"
    )
    _recipe_args(p)
    p.add_argument("--model", required=True, help="merged/full model folder or adapter folder")
    p.add_argument("--dataset", required=True, help="a `kubetune prepare` output folder")
    p.add_argument("--output", required=True, help="folder for metrics.json, generations, report")
    p.add_argument("--baseline", help="the base model (folder or model id) to compare against")
    p.add_argument(
        "--training-metrics",
        help="training metrics.json for the loss curve (default: found beside the model)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=cmd_evaluate)


def _storage_commands(sub) -> None:
    """push, pull and the tiny models."""
    p = sub.add_parser(
        "push", help="upload a model to s3://bucket/prefix or a folder; manifest.json last"
    )
    p.add_argument("src", help="model folder (merge, train or any folder of files)")
    p.add_argument("dest", help="s3://bucket/prefix or a local folder")
    p.add_argument("--metrics", help="evaluation metrics.json to record in the manifest")
    p.add_argument("--part-size-mb", type=int, default=64, help="multipart part size (MiB)")
    p.add_argument("--workers", type=int, default=8, help="parallel uploads")
    p.add_argument(
        "--recipe",
        help="register the pushed model as the recipe's output.model_registry says (with --set)",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one field of --recipe (repeatable)",
    )
    p.add_argument("--version", help="with --recipe: the registered version's name")
    p.add_argument(
        "--sse",
        choices=("AES256", "aws:kms"),
        help="server-side encryption of every object (default: the recipe's output.sse)",
    )
    p.add_argument(
        "--sse-kms-key-id",
        help="with --sse aws:kms: the KMS key (default: the recipe's output.sse_kms_key_id)",
    )
    p.set_defaults(func=cmd_push)

    p = sub.add_parser(
        "pull", help="download a pushed model, only if manifest.json and every checksum match"
    )
    p.add_argument("uri", help="s3://bucket/prefix or a folder that `kubetune push` wrote")
    p.add_argument("output", help="folder to create")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--workers", type=int, default=8, help="parallel downloads")
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("tiny", help="build a tiny://ARCH model (random weights, no download)")
    p.add_argument("arch", help="falcon, falcon-40b, llama, mistral or qwen2")
    p.add_argument("--output", help="copy it to this folder (default: print the cache folder)")
    p.set_defaults(func=cmd_tiny)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command not in ("version", "recipes"):
        quiet_progress_off_terminal()
    try:
        code = args.func(args)
        write_stdout("")  # a full disk behind a redirect: one line here, not at exit
        return code
    except UserError as exc:
        print(f"error: {redact(str(exc))}", file=sys.stderr)
        return 2
    except Exception as exc:
        cause = storage_cause(exc)
        if cause is None:  # a bug: the traceback is worth reading
            raise
        where = getattr(exc, "filename", None) or "the output"
        print(f"error: {where}: {cause}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
