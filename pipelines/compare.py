"""`kubetune compare RECIPE --methods lora,adapter,adapter_v2,full`: one KFP pipeline that
prepares the data once, then trains, merges and evaluates every method in its own branch
(`dsl.ParallelFor`; on a cluster each branch's training is its own PyTorchJob or TrainJob),
and ends in a comparison step: one table and an HTML report, methods side by side.

Branches write under RUN_DIR/methods/METHOD; the comparison under RUN_DIR/comparison. Nothing
is pushed: a comparison informs the choice of a method, and its winner is then run with
`kubetune run` / `submit`.
"""

# no `from __future__ import annotations`: KFP reads the pipeline's annotations as types
from pathlib import Path
from typing import Optional

from kfp import dsl

from kubetune.components.compare_methods.component import compare_methods, method_branches
from kubetune.components.compare_methods.settings import (
    branch_config,
    format_methods,
    parse_methods,
)
from kubetune.components.config import RunConfig, dump_config
from kubetune.components.errors import UserError
from kubetune.components.outputs import staged_file
from kubetune.pipelines.preflight import preflight
from kubetune.pipelines.tasks import (
    fetch_and_prepare,
    local_copy,
    on_cluster,
    pipeline_config,
    recipe_fields,
    recipe_parameter,
    resolve_task,
    train_merge_evaluate,
    ws,
)

PIPELINE_NAME = "kubetune-compare"


def build_compare_pipeline(
    cfg: RunConfig,
    methods: str,
    workspace: Optional[str] = None,  # noqa: UP045
    parallelism: int = 0,
):
    """The comparison pipeline of one recipe and `--methods` text (lora,adapter:train.lr=9e-3);
    `parallelism` 0 runs every branch at once (a cluster: one PyTorchJob each), 1 one at a time
    (one machine: comparable timings)."""
    names, extra = parse_methods(methods)
    if cfg.stages:
        stages = ", ".join(s.name for s in cfg.stages)
        raise UserError(
            f"compare trains each method on one recipe, and this one has stages ({stages}): "
            "`kubetune run` trains them in order and its last evaluation tables each stage "
            "against the one before (SFT against SFT+DPO); compare methods on a recipe "
            "without stages"
        )
    for method in names:  # refuse a branch the recipe cannot run before anything starts
        try:
            branch_config(dump_config(cfg), cfg, method, extra.get(method))
        except UserError as exc:
            raise UserError(f"--methods {method}: {exc}") from None
    cfg = local_copy(cfg, workspace)
    recipe_text = recipe_parameter(cfg)
    fields = recipe_fields(cfg)  # the recipe's values: every branch sets its own method
    gpu = cfg.hardware.uses_gpu

    @dsl.pipeline(
        name=PIPELINE_NAME,
        description=f"Compare fine-tuning methods on {cfg.model.name_or_path} with kubetune: "
        "prepare once, train, merge and evaluate each method, one table and report.",
        pipeline_config=pipeline_config(cfg),
    )
    def compare(
        recipe_yaml: str = recipe_text,
        overrides: list = [],  # noqa: B006 (KFP reads the default; KEY=VALUE strings)
        workspace: str = workspace or cfg.kubernetes.workspace_mount,
        methods: str = format_methods(names, extra),
    ) -> str:
        resolved = resolve_task(cfg, recipe_yaml, overrides, workspace, fields)
        run_dir, recipe, prepared = fetch_and_prepare(cfg, resolved)
        # the loop iterates over a task's output, and its body reads only the loop item:
        # every value a branch needs travels in it
        branches = method_branches(
            recipe_yaml=recipe,
            run_dir=run_dir,
            dataset_dir=prepared.outputs["Output"],
            methods=methods,
            **ws(cfg),
        )
        on_cluster(branches, cfg, s3=False).set_display_name("methods")
        with dsl.ParallelFor(branches.output, parallelism=parallelism) as branch:
            _, evaluated = train_merge_evaluate(
                cfg, branch.recipe_yaml, branch.dataset_dir, branch.run_dir, gpu
            )

        compared = compare_methods(
            recipe_yaml=recipe,
            eval_dirs=dsl.Collected(evaluated.outputs["Output"]),
            run_dir=run_dir,
            **ws(cfg),
        )
        on_cluster(compared, cfg, s3=False).set_display_name("compare")
        return compared.outputs["Output"]

    return compare


def compile_compare(cfg: RunConfig, methods: str, path: str) -> None:
    from kfp import compiler

    preflight(cfg)
    with staged_file(Path(path)) as tmp:  # a full disk leaves no half-written YAML
        compiler.Compiler().compile(build_compare_pipeline(cfg, methods), package_path=str(tmp))
