"""The bodies of the pipeline's KFP components (pipelines/finetune.py).

Every step after `resolve_recipe` gets the resolved recipe YAML and the run's folder on the
workspace volume (`WORKSPACE/runs/RUN_ID`); datasets and weights stay there and only their
paths travel between tasks, never the bytes through KFP's artifact store.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

# Recipe fields that the pipeline exposes as its own parameters (the KFP UI's run form), with
# the parameter name each one gets. Any other field: the `overrides` parameter (KEY=VALUE).
PIPELINE_FIELDS = (
    ("model.name_or_path", "model_name_or_path", str),
    ("data.path", "data_path", str),
    ("data.format", "data_format", str),
    ("data.max_seq_len", "data_max_seq_len", int),
    ("method", "method", str),
    ("lora.r", "lora_r", int),
    ("lora.alpha", "lora_alpha", float),
    ("train.epochs", "train_epochs", float),
    ("train.lr", "train_lr", float),
    ("train.micro_batch_size", "train_micro_batch_size", int),
    ("train.grad_accum", "train_grad_accum", int),
    ("distributed.nodes", "distributed_nodes", int),
    ("distributed.procs_per_node", "distributed_procs_per_node", int),
    ("distributed.backend", "distributed_backend", str),
    ("eval.num_prompts", "eval_num_prompts", int),
    ("output.uri", "output_uri", str),
)


def field_value(cfg, dotted: str):
    node = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def _cfg(recipe_yaml: str):
    from ..config import parse_recipe

    return parse_recipe(recipe_yaml, "recipe")


def resolve(recipe_yaml: str, overrides: list, fields: dict, workspace: str, run_id: str):
    """Apply the pipeline's field parameters, then `overrides`, to the recipe; validate it.
    Returns (resolved recipe YAML, run folder)."""
    from ..config import dump_config, parse_recipe

    sets = [f"{dotted}={json.dumps(fields[name])}" for dotted, name, _ in PIPELINE_FIELDS]
    cfg = parse_recipe(recipe_yaml, "recipe", sets + [str(o) for o in overrides])
    run_dir = Path(workspace) / "runs" / run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    return dump_config(cfg), str(run_dir)


def fetch(recipe_yaml: str, run_dir: str) -> str:
    """Fetch the model once per revision into WORKSPACE/models (the workspace holds run_dir
    as WORKSPACE/runs/RUN_ID); returns the recipe pointing at that copy (model.local_dir)."""
    from ..config import dump_config
    from ..fetch_model import fetch_summary, fetched_config

    cfg, record = fetched_config(_cfg(recipe_yaml), Path(run_dir).parent.parent)
    print(fetch_summary(cfg, record))
    return dump_config(cfg)


def prepare(recipe_yaml: str, run_dir: str, metrics, summary_path: str) -> str:
    from ..prepare_dataset.kfp_outputs import report_to_kfp
    from ..prepare_dataset.step import prepare_dataset

    out = Path(run_dir) / "dataset"
    stats = prepare_dataset(_cfg(recipe_yaml), out, overwrite=True)
    report_to_kfp(stats, metrics, summary_path)
    return str(out)


def train(recipe_yaml: str, dataset_dir: str, run_dir: str) -> str:
    from ..train.launcher import train as launch
    from ..train.pytorchjob import job_name

    # the same name on every retry of this task: the launcher adopts the job it created
    os.environ.setdefault("KUBETUNE_JOB_NAME", job_name("kfp", run_dir))
    out = Path(run_dir) / "train"
    code = launch(_cfg(recipe_yaml), dataset_dir, out)
    if code != 0:
        raise RuntimeError(f"training failed (exit code {code}); see the log above")
    return str(out)


def merge(recipe_yaml: str, train_dir: str, run_dir: str) -> str:
    from ..merge_adapter.step import merge_adapter

    cfg = _cfg(recipe_yaml)
    if cfg.method == "full":  # full fine-tuning wrote the whole model already
        return train_dir
    out = Path(run_dir) / "model"
    merge_adapter(cfg, train_dir, out, overwrite=True)
    return str(out)


def evaluate(
    recipe_yaml: str, model_dir: str, dataset_dir: str, run_dir: str, metrics, report_path: str
) -> str:
    import shutil

    from ..evaluate.step import evaluate as run_evaluate
    from ..evaluate.step import kfp_metrics

    cfg = _cfg(recipe_yaml)
    out = Path(run_dir) / "eval"
    result = run_evaluate(
        cfg, model_dir, dataset_dir, out, baseline=cfg.model.name_or_path, overwrite=True
    )
    for name, value in kfp_metrics(result).items():
        metrics.log_metric(name, value)
    shutil.copyfile(out / "report.html", report_path)
    return str(out)


def gate_passed(eval_dir: str) -> bool:
    metrics = json.loads((Path(eval_dir) / "metrics.json").read_text())
    checks = metrics["gate"]["checks"]
    for check in checks:
        print(
            f"{check['metric']} {check['value']} {check['op']} {check['threshold']}: "
            f"{'passed' if check['passed'] else 'FAILED'}"
        )
    if not checks:
        print("no quality gate set (eval.min_rouge_l, eval.max_eval_loss): passed")
    return bool(metrics["gate"]["passed"])


def push(recipe_yaml: str, model_dir: str, eval_dir: str, summary_path: str | None = None) -> str:
    from ..push_model.step import push as run_push

    cfg = _cfg(recipe_yaml)
    evaluation = json.loads((Path(eval_dir) / "metrics.json").read_text())
    run_push(model_dir, cfg.output.uri, evaluation=evaluation)
    if summary_path:
        Path(summary_path).write_text(pushed_summary(cfg.output.uri, Path(model_dir)))
    return cfg.output.uri.rstrip("/") + "/manifest.json"


def pushed_summary(uri: str, model_dir: Path) -> str:
    """The KFP UI's Markdown for a pushed model: where it is, its manifest, its TensorBoard."""
    root = uri.rstrip("/")
    lines = [
        f"# Model pushed to `{root}/`",
        "",
        f"- manifest (written last; read it before the weights): `{root}/manifest.json`",
    ]
    if (model_dir / "tensorboard").is_dir():
        lines += [
            f"- TensorBoard events of the training run: `{root}/tensorboard/`",
            "",
            f"Open them with `tensorboard --logdir {root}/tensorboard`, or point a Kubeflow "
            f"`Tensorboard` resource's `logspath` at `{root}/tensorboard`.",
        ]
    return "\n".join(lines) + "\n"


def method_branches(recipe_yaml: str, run_dir: str, dataset_dir: str, methods: list) -> list:
    """The branches of `kubetune compare`, one per method: the recipe with `method` set
    (validated: a method the recipe cannot run fails here, naming it), the branch's folder
    RUN_DIR/methods/METHOD and the prepared data they share. ParallelFor iterates over them."""
    from ..config import dump_config, parse_recipe
    from ..train.llama_adapter import check_recipe

    branches = []
    for method in methods:
        cfg = parse_recipe(recipe_yaml, "recipe", [f"method={method}"])
        check_recipe(cfg)
        out = Path(run_dir) / "methods" / method
        out.mkdir(parents=True, exist_ok=True)
        branches.append(
            {
                "method": method,
                "recipe_yaml": dump_config(cfg),
                "run_dir": str(out),
                "dataset_dir": dataset_dir,
            }
        )
    return branches


def compare(recipe_yaml: str, eval_dirs: list, run_dir: str, report_path: str, summary_path: str):
    """The comparison table and report over every branch's evaluation, into
    RUN_DIR/comparison; the report and the Markdown table for the KFP UI."""
    import shutil

    from ..compare_methods import compare_methods

    cfg = _cfg(recipe_yaml)
    out = Path(run_dir) / "comparison"
    compare_methods(cfg.model.name_or_path, [str(d) for d in eval_dirs], out)
    shutil.copyfile(out / "report.html", report_path)
    shutil.copyfile(out / "comparison.md", summary_path)
    print((out / "comparison.md").read_text())
    return str(out)
