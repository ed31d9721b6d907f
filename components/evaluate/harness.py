"""The forgetting check: lm-evaluation-harness tasks scored on the base and the tuned model.

`eval.lm_eval_tasks` names the tasks: a name lm-eval registers (arc_easy, hellaswag, mmlu ...;
their datasets come from the hub, so they need the network) or the path of a task YAML file
(lm-eval's own task format; relative data files are read from the YAML's folder, so a task with
its data beside it works offline). Each model is scored while the evaluate step holds it,
through lm-eval's `HFLM` wrapper of that same model object, so the numbers are the harness's
own. A task's score is its first metric (the first of its `metric_list`, lm-eval's order);
`eval.max_regression` fails the gate when that score falls below the base model's by more than
the bound, in the metric's own direction (`higher_is_better`).
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path

from ..config import RunConfig
from ..errors import UserError


@dataclass(frozen=True)
class HarnessTask:
    name: str  # the task or group name lm-eval knows
    entry: str  # as the recipe wrote it
    folder: Path | None  # a task file's folder: where its relative data files are


def is_task_file(entry: str) -> bool:
    return entry.endswith((".yaml", ".yml")) or "/" in entry


def needs_hub(entries: list[str]) -> bool:
    """Whether any task is a registered one, whose dataset comes from the hub."""
    return any(not is_task_file(entry) for entry in entries)


def _quiet() -> None:
    for name in ("lm_eval", "lm-eval"):
        logging.getLogger(name).setLevel(logging.ERROR)


def check_task_file(path: Path, where: str) -> None:
    """Load a task file as lm-eval will, its includes and `!function` helpers (a module beside
    the YAML) with it, so that a missing helper is refused before any model is loaded rather
    than when the first model is scored."""
    import yaml
    from lm_eval.tasks._yaml_loader import load_yaml

    try:
        load_yaml(path, resolve_func=True)
    except (ImportError, AttributeError, ValueError, OSError, yaml.YAMLError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"{where}: {first}") from None


def resolve_tasks(entries: list[str]) -> tuple[list[HarnessTask], object]:
    """The recipe's tasks checked against lm-eval's index (files exist and define a task; names
    are registered) before any model is loaded, and the TaskManager that knows them."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise UserError(
            "eval.lm_eval_tasks needs lm-evaluation-harness: pip install 'kubetune[lmeval]'"
        ) from None
    _quiet()
    files = {}
    for i, entry in enumerate(entries):
        if is_task_file(entry):
            path = Path(entry).expanduser()
            if not path.is_file():
                raise UserError(f"eval.lm_eval_tasks[{i}]: {entry}: no such task file")
            files[entry] = path.resolve()
    include = sorted({str(path.parent) for path in files.values()})
    manager = TaskManager(include_path=include or None, include_defaults=needs_hub(entries))
    tasks = []
    for i, entry in enumerate(entries):
        if entry in files:
            names = [
                name
                for name, item in manager.task_index.items()
                if item.yaml_path is not None
                and Path(item.yaml_path).resolve() == files[entry]
                and item.kind.name in ("TASK", "GROUP")
            ]
            if not names:
                raise UserError(
                    f"eval.lm_eval_tasks[{i}]: {entry}: defines no lm-eval task "
                    "(a task YAML has `task: NAME`, a group `group: NAME`)"
                )
            check_task_file(files[entry], f"eval.lm_eval_tasks[{i}]: {entry}")
            # a group file also indexes the tasks it lists inline: the group is the entry
            groups = [n for n in names if manager.task_index[n].kind.name == "GROUP"]
            tasks.append(HarnessTask((groups or names)[0], entry, files[entry].parent))
        elif entry in manager.all_tasks:
            tasks.append(HarnessTask(entry, entry, None))
        else:
            close = [n for n in manager.all_tasks if entry.lower() in n.lower()][:5]
            hint = (
                f" (similar: {', '.join(close)})" if close else " (`lm-eval ls tasks` lists them)"
            )
            raise UserError(f"eval.lm_eval_tasks[{i}]: {entry}: not an lm-eval task{hint}")
    return tasks, manager


def _primary(result: dict, name: str) -> dict:
    """The task's first metric (lm-eval's order) with its stderr, direction and sample count."""
    values = result["results"][name]
    directions = result.get("higher_is_better", {}).get(name, {})
    for key, value in values.items():
        metric, _, filt = key.partition(",")
        if not filt or metric.endswith("_stderr") or not isinstance(value, int | float):
            continue
        stderr = values.get(f"{metric}_stderr,{filt}")
        samples = result.get("n-samples", {}).get(name, {}).get("effective")
        return {
            "task": name,
            "metric": metric if filt == "none" else f"{metric} ({filt})",
            "value": float(value),
            "stderr": float(stderr) if isinstance(stderr, int | float) else None,
            "higher_is_better": bool(directions.get(metric, True)),
            "samples": samples,
        }
    raise UserError(f"lm-eval task {name} reported no numeric metric")


def score(model, tokenizer, tasks: list[HarnessTask], manager, cfg: RunConfig) -> list[dict]:
    """Each task's primary score for this (loaded) model."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    _quiet()
    device = next(model.parameters()).device
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=cfg.eval.batch_size, device=device)
    scores = []
    for task in tasks:
        folder = task.folder or Path.cwd()
        try:
            with contextlib.chdir(folder):
                result = lm_eval.simple_evaluate(
                    model=lm,
                    tasks=[task.name],
                    task_manager=manager,
                    limit=cfg.eval.lm_eval_limit,
                    num_fewshot=cfg.eval.lm_eval_num_fewshot,
                    log_samples=False,
                    random_seed=cfg.train.seed,
                    numpy_random_seed=cfg.train.seed,
                    torch_random_seed=cfg.train.seed,
                    fewshot_random_seed=cfg.train.seed,
                )
        except (OSError, ValueError, KeyError, ImportError) as exc:
            # a task's data or a module it imports that is missing or malformed: lm-eval and
            # datasets raise these
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise UserError(f"eval.lm_eval_tasks: {task.entry}: {first}") from None
        scores.append(_primary(result, task.name))
    return scores


def side_by_side(base: list[dict], tuned: list[dict]) -> list[dict]:
    """Per task: base and tuned score, the change, and the regression (a fall, in the metric's
    own direction; negative when the tuned model is better)."""
    rows = []
    for b, t in zip(base, tuned, strict=True):
        change = t["value"] - b["value"]
        rows.append(
            {
                "task": t["task"],
                "metric": t["metric"],
                "higher_is_better": t["higher_is_better"],
                "samples": t["samples"],
                "base": b["value"],
                "base_stderr": b["stderr"],
                "tuned": t["value"],
                "tuned_stderr": t["stderr"],
                "change": change,
                "regression": -change if t["higher_is_better"] else change,
            }
        )
    return rows


def regression_checks(cfg: RunConfig, rows: list[dict]) -> list[dict]:
    """One gate check per task when eval.max_regression is set."""
    bound = cfg.eval.max_regression
    if bound is None:
        return []
    checks = []
    for row in rows:
        value = row["regression"]
        passed = not math.isnan(value) and value <= bound + 1e-12
        checks.append(
            {
                "metric": f"{row['task']} {row['metric']} drop",
                "op": "<=",
                "threshold": bound,
                "value": value,
                "passed": passed,
            }
        )
    return checks
