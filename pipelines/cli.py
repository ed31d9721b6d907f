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


def cmd_fetch_model(args) -> int:
    from kubetune.components.fetch_model.step import fetch, fetch_summary

    cfg = load_recipe(args.recipe, args.overrides)
    record = fetch(cfg.model, args.workspace)
    print(fetch_summary(cfg, record))
    if record is not None:
        print(
            f"use it: --set model.local_dir={record['path']} --set model.commit={record['commit']}"
        )
    return 0


def cmd_prepare(args) -> int:
    from kubetune.components.prepare_dataset.step import prepare

    cfg = load_recipe(args.recipe, args.overrides)
    stats = prepare(cfg, args.output, overwrite=args.overwrite)
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
    from kubetune.components.train.step import train

    cfg = load_recipe(args.recipe, args.overrides)
    return train(cfg, args.dataset, args.output)


def cmd_merge(args) -> int:
    from kubetune.components.merge_adapter.step import merge

    cfg = load_recipe(args.recipe, args.overrides)
    summary = merge(cfg, args.adapter, args.output, overwrite=args.overwrite)
    print(summary["message"])
    return 0


def cmd_evaluate(args) -> int:
    from kubetune.components.evaluate.step import evaluate

    cfg = load_recipe(args.recipe, args.overrides)
    metrics = evaluate(
        cfg,
        args.model,
        args.dataset,
        args.output,
        baseline=args.baseline,
        training_metrics=args.training_metrics,
        overwrite=args.overwrite,
    )
    sides = [("tuned", metrics["tuned"])]
    if metrics["baseline"]:
        sides.insert(0, ("base", metrics["baseline"]))
    print(
        f"{'':6} {'eval loss':>10} {'perplexity':>11} {'ROUGE-1':>8} {'ROUGE-2':>8} "
        f"{'ROUGE-L':>8} {'exact':>6}"
    )
    for name, m in sides:
        loss = f"{m['eval_loss']:.4f}" if m["eval_loss"] is not None else "-"
        ppl = f"{m['perplexity']:.2f}" if m["perplexity"] is not None else "-"
        print(
            f"{name:6} {loss:>10} {ppl:>11} {m['rouge1']:8.4f} {m['rouge2']:8.4f} "
            f"{m['rougeL']:8.4f} {m['exact_match']:6.3f}"
        )
    rows = (metrics.get("lm_eval") or {}).get("tasks", [])
    if rows:
        width = max(len(f"{r['task']} {r['metric']}") for r in rows)
        print(f"{'lm-eval task':{width}} {'base':>8} {'tuned':>8} {'change':>8}")
        for r in rows:
            label = f"{r['task']} {r['metric']}"
            print(f"{label:{width}} {r['base']:8.4f} {r['tuned']:8.4f} {r['change']:+8.4f}")
    gate = metrics["gate"]
    if gate["checks"]:
        failed = [c["metric"] for c in gate["checks"] if not c["passed"]]
        print(f"quality gate: {'passed' if gate['passed'] else 'FAILED: ' + ', '.join(failed)}")
    out = Path(args.output)
    print(f"wrote {out / 'metrics.json'}, {out / 'generations.jsonl'} and {out / 'report.html'}")
    return 0


def cmd_push(args) -> int:
    from kubetune.components.push_model.step import push

    evaluation = None
    if args.metrics:
        try:
            evaluation = json.loads(Path(args.metrics).read_text())
        except (OSError, ValueError) as exc:
            raise UserError(f"--metrics {args.metrics}: {exc}") from None
    register = None
    if args.recipe:
        from kubetune.components.push_model.kfp_body import registrar

        cfg = load_recipe(args.recipe, args.overrides)
        if cfg.output.model_registry is not None and not args.version:
            raise UserError("--version: name the registered version (e.g. the run's id)")
        register = registrar(cfg, args.version)
    summary = push(
        args.src,
        args.dest,
        evaluation=evaluation,
        part_size=args.part_size_mb * 1024 * 1024,
        workers=args.workers,
        register=register,
    )
    print(
        f"pushed {summary['uploaded']} file(s), {summary['bytes_uploaded']} bytes "
        f"({summary['skipped']} already there) in {summary['seconds']:.1f} s"
    )
    print(
        f"wrote {args.dest.rstrip('/')}/manifest.json ({summary['files']} files, "
        f"{summary['total_bytes']} bytes)"
    )
    return 0


def cmd_pull(args) -> int:
    from kubetune.components.push_model.step import pull

    summary = pull(args.uri, args.output, overwrite=args.overwrite, workers=args.workers)
    print(
        f"pulled {summary['files']} file(s), {summary['total_bytes']} bytes, all checksums "
        f"match; wrote {args.output}"
    )
    return 0


def checked_job_name(name: str, where: str, nodes: int) -> str:
    from kubetune.components.k8s_values import check_job_name

    try:
        return check_job_name(name, where, nodes)
    except ValueError as exc:
        raise UserError(str(exc)) from None


def cmd_render_job(args) -> int:
    from kubetune.components.backends.kubernetes import check_paths, default_job_name
    from kubetune.components.backends.pytorchjob import default_paths, render_job, to_yaml
    from kubetune.components.backends.trainjob import render_runtime, render_trainjob

    cfg = load_recipe(args.recipe, args.overrides)
    kind = args.kind or ("trainjob" if cfg.distributed.backend == "trainjob" else "pytorchjob")
    if kind == "runtime":
        sys.stdout.write(to_yaml(render_runtime(cfg)))
        return 0
    if args.name:
        name = checked_job_name(args.name, "--name", cfg.distributed.nodes)
    else:
        dataset, output = default_paths(cfg, "run")
        name = default_job_name(cfg, args.dataset or dataset, args.output or output)
    dataset, output = default_paths(cfg, name)
    dataset, output = args.dataset or dataset, args.output or output
    check_paths(cfg, dataset, output)
    render = render_trainjob if kind == "trainjob" else render_job
    sys.stdout.write(to_yaml(render(cfg, name, dataset, output)))
    return 0


def cmd_render_serve(args) -> int:
    from kubetune.components.backends.pytorchjob import to_yaml
    from kubetune.components.serve.render import render_inference_service

    cfg = load_recipe(args.recipe, args.overrides)
    sys.stdout.write(to_yaml(render_inference_service(cfg, args.uri, args.name)))
    return 0


def cmd_deploy(args) -> int:
    from kubetune.components.serve.deploy import deploy

    cfg = load_recipe(args.recipe, args.overrides)
    result = deploy(cfg, args.uri, args.name)
    print(f"Q: {result['prompt']}\nA: {result['answer']}")
    return 0


def cmd_compile(args) -> int:
    from kubetune.pipelines.finetune import compile_pipeline

    cfg = load_recipe(args.recipe, args.overrides)
    compile_pipeline(cfg, args.output)
    print(f"wrote {args.output} (upload it in the KFP UI, or `kubetune submit`)")
    return 0


VERBOSE_HELP = (
    "print KFP's executor logs and every step's output as they come (always in RUN/kfp-local.log)"
)


def cmd_run(args) -> int:
    from kubetune.pipelines.local import run_local

    if not args.local:
        raise UserError("kubetune run needs --local (on a cluster: kubetune submit --host URL)")
    return run_local(args.recipe, args.overrides, args.workspace, verbose=args.verbose)


def cmd_compare(args) -> int:
    from kubetune.components.compare_methods.settings import parse_methods
    from kubetune.pipelines.compare import compile_compare

    names, _ = parse_methods(args.methods)  # checked before anything starts
    methods = args.methods
    if args.local:
        from kubetune.pipelines.local import compare_local

        return compare_local(
            args.recipe, args.overrides, methods, args.workspace, verbose=args.verbose
        )
    if not args.output:
        raise UserError(
            "kubetune compare needs --local (run it here) or --output FILE (the pipeline YAML "
            "to upload in the KFP UI)"
        )
    cfg = load_recipe(args.recipe, args.overrides)
    compile_compare(cfg, methods, args.output)
    print(f"wrote {args.output}: methods {', '.join(names)} (upload it in the KFP UI)")
    return 0


def cmd_submit(args) -> int:
    from kubetune.pipelines.submit import submit

    cfg = load_recipe(args.recipe, args.overrides)
    result = submit(
        cfg,
        host=args.host,
        experiment=args.experiment,
        schedule=args.schedule,
        run_name=args.run_name,
        namespace=args.namespace,
    )
    for key, value in result.items():
        print(f"{key}: {value}")
    return 0


def cmd_plan(args) -> int:
    from kubetune.components.train.plan import estimate, inference_plan, render

    cfg = load_recipe(args.recipe, args.overrides)
    plan = estimate(cfg)
    if args.json:
        print(json.dumps(plan.as_dict(), indent=1))
        return 0
    serving = inference_plan(cfg, plan.arch)  # the model estimate counted already
    print(render(plan, cfg), end="")
    gpus = f"{serving.gpus} x {serving.gpu}" if serving.gpus else "no GPU"
    print(
        f"\nserving (render-serve): {gpus}, {serving.memory} memory per replica ({serving.reason})"
    )
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
        description="Fine-tune open LLMs (QLoRA, LoRA, LLaMA-Adapter, full) as Kubeflow Pipelines steps.",
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
        "plan", help="predict peak GPU memory per GPU and whether it fits hardware.gpu"
    )
    _recipe_args(p)
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=cmd_plan)

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
