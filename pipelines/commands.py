"""What each `kubetune` subcommand does (cli.py declares them and their arguments): load the
recipe, call the step or pipeline function, print what a person reads. Heavy imports happen
inside each command, so `kubetune config` or `compile` never load torch."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from kubetune.components import __version__
from kubetune.components.config import RECIPES_DIR, dump_config, load_recipe
from kubetune.components.errors import UserError
from kubetune.components.outputs import storage_cause
from kubetune.pipelines.preflight import check_serving, preflight


def write_stdout(text: str) -> None:
    """Print a document (YAML, a config) that is often redirected to a file: a full disk or a
    closed pipe there is one line, not a traceback."""
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except OSError as exc:
        cause = storage_cause(exc)
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (nothing more can reach the file)
        if cause is None:
            raise
        raise UserError(f"standard output: {cause}") from None


def cmd_version(args) -> int:
    print(f"kubetune {__version__}")
    return 0


def cmd_recipes(args) -> int:
    for path in sorted(RECIPES_DIR.glob("*.yaml")):
        print(path.stem)
    return 0


def cmd_config(args) -> int:
    cfg = load_recipe(args.recipe, args.overrides)
    write_stdout(dump_config(cfg))
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
    from kubetune.components.backends.base import training_backend
    from kubetune.components.backends.taskconfig import TaskConfig
    from kubetune.components.train.step import train

    cfg = load_recipe(args.recipe, args.overrides)
    task, name = None, None
    if not training_backend(cfg).local:  # a KFP task reproduced by hand (taskconfig.py)
        task, name = TaskConfig.from_command_line()
    return train(cfg, args.dataset, args.output, task, name)


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
    if metrics["tuned"].get("preference_accuracy") is not None:  # held-out pairs
        for name, m in sides:
            reward = m.get("reward_accuracy")
            print(
                f"{name:6} preference accuracy {m['preference_accuracy']:.4f} on {m['pairs']} "
                "held-out pairs"
                + (f", reward accuracy {reward:.4f} (base as reference)" if reward else "")
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
    from kubetune.components.push_model.upload import Encryption

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
        if cfg.output.model_registry is None and args.version:
            raise UserError(
                f"--version {args.version}: the recipe has no output.model_registry to "
                "register a version in"
            )
        register = registrar(cfg, args.version)
        sse = args.sse or cfg.output.sse
        kms_key = args.sse_kms_key_id or cfg.output.sse_kms_key_id
    else:
        if args.version:
            raise UserError(f"--version {args.version}: only used with --recipe (a registry)")
        sse, kms_key = args.sse, args.sse_kms_key_id
    if kms_key and sse != "aws:kms":
        raise UserError("--sse-kms-key-id is only used with --sse aws:kms")
    summary = push(
        args.src,
        args.dest,
        evaluation=evaluation,
        part_size=args.part_size_mb * 1024 * 1024,
        workers=args.workers,
        register=register,
        encryption=Encryption(sse, kms_key),
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
    from kubetune.components.backends.pod import default_paths, to_yaml
    from kubetune.components.backends.pytorchjob import render_job
    from kubetune.components.backends.trainjob import render_runtime, render_trainjob

    cfg = load_recipe(args.recipe, args.overrides)
    preflight(cfg, cluster=False)
    kind = args.kind or ("trainjob" if cfg.distributed.backend == "trainjob" else "pytorchjob")
    if kind == "runtime":
        write_stdout(to_yaml(render_runtime(cfg)))
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
    write_stdout(to_yaml(render(cfg, name, dataset, output)))
    return 0


def cmd_render_serve(args) -> int:
    from kubetune.components.backends.pod import to_yaml

    cfg = load_recipe(args.recipe, args.overrides)
    preflight(cfg, cluster=False)
    write_stdout(to_yaml(check_serving(cfg, args.uri, args.name)))
    return 0


def cmd_deploy(args) -> int:
    from kubetune.components.serve.deploy import deploy

    cfg = load_recipe(args.recipe, args.overrides)
    preflight(cfg, cluster=False)
    result = deploy(cfg, args.uri, args.name)
    print(f"Q: {result['prompt']}\nA: {result['answer']}")
    return 0


def cmd_compile(args) -> int:
    from kubetune.pipelines.finetune import compile_pipeline

    cfg = load_recipe(args.recipe, args.overrides)
    compile_pipeline(cfg, args.output)
    print(f"wrote {args.output} (upload it in the KFP UI, or `kubetune submit`)")
    return 0


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
    from kubetune.components.planner.forecast import options
    from kubetune.components.planner.options_table import render_options
    from kubetune.components.planner.plan import estimate, inference_plan, render
    from kubetune.components.planner.speed import Efficiency

    cfg = load_recipe(args.recipe, args.overrides)
    plan = estimate(cfg)
    eff = Efficiency.load()
    chosen, data = options(cfg, args.gpus, args.dataset, eff)
    if args.json:
        record = plan.as_dict()
        record["speed"] = {
            "efficiency": eff.__dict__,
            "rows": data.__dict__,
            "options": [o.as_dict() for o in chosen],
        }
        print(json.dumps(record, indent=1))
        return 0
    serving = inference_plan(cfg, plan.arch)  # the model estimate counted already
    print(render(plan, cfg), end="")
    gpus = f"{serving.gpus} x {serving.gpu}" if serving.gpus else "no GPU"
    print(
        f"\nserving (render-serve): {gpus}, {serving.memory} memory per replica ({serving.reason})"
    )
    print(render_options(chosen, data, eff), end="")
    return 0


def cmd_tiny(args) -> int:
    import shutil

    from kubetune.components.outputs import staged_output
    from kubetune.components.tiny_models import tiny_model_dir

    source = tiny_model_dir(f"tiny://{args.arch}")
    if args.output:
        output = Path(args.output)
        with staged_output(output, overwrite=False) as staging:
            shutil.copytree(source, staging, dirs_exist_ok=True)
        source = output
    print(json.dumps({"arch": args.arch, "path": str(source)}))
    return 0
