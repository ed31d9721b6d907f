"""The settings each branch of `kubetune compare` trains with, from one table.

A fair comparison trains every method the way it is known to work, not with the one learning
rate the recipe chose for its own method: LLaMA-Adapter's prompts and gates learn at 9e-3 where
LoRA learns at 3e-4. A branch's settings, later ones winning:

1. `METHOD_DEFAULTS[method]`, the published settings of that method, for every method except
   the recipe's own (whose settings the recipe already tuned);
2. the recipe's `compare.METHOD` (dotted keys, as for `--set`): what this model needs;
3. `--methods METHOD:KEY=VALUE,...` on the command line.

Only what training reads may differ between branches (train.*, lora.*, adapter.*, quant.*,
distributed.*): the model, the prepared data and the evaluation are shared, or the comparison
would not compare methods.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import UserError
from ..methods import NAMES, REGISTRY

if TYPE_CHECKING:
    from ..config import RunConfig

# Published per-method hyper-parameters (Alpaca-scale instruction tuning of 7B models): each
# method's `published` settings (components/methods/).
METHOD_DEFAULTS: dict[str, dict[str, object]] = {n: dict(m.published) for n, m in REGISTRY.items()}
METHODS = NAMES
BRANCH_SECTIONS = ("train", "lora", "adapter", "quant", "distributed")


def check_key(key: str, where: str) -> None:
    section = key.split(".", 1)[0]
    if "." not in key or section not in BRANCH_SECTIONS:
        raise UserError(
            f"{where}: {key}: a branch may only change what training reads "
            f"({', '.join(s + '.*' for s in BRANCH_SECTIONS)}); the model, the data and the "
            "evaluation are shared by every method"
        )


def parse_methods(text: str) -> tuple[list[str], dict[str, dict[str, str]]]:
    """`--methods lora,adapter:train.lr=9e-3,adapter.start_layer=0`: the methods in order and
    each one's KEY=VALUE overrides (a comma-separated KEY=VALUE belongs to the method before
    it). Known methods, each once, at least two."""
    methods: list[str] = []
    overrides: dict[str, dict[str, str]] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        if ":" not in item and "=" in item:
            if not methods:
                raise UserError(f"--methods: {item}: name the method first (METHOD:KEY=VALUE)")
            method, setting = methods[-1], item
        else:
            method, _, setting = item.partition(":")
            method = method.strip()
            if method not in METHODS:
                raise UserError(
                    f"--methods: unknown method {method!r} (known: {', '.join(METHODS)})"
                )
            if method in methods:
                raise UserError(f"--methods: {method} is listed twice")
            methods.append(method)
            overrides[method] = {}
        if setting:
            key, eq, value = setting.partition("=")
            key = key.strip()
            if not eq or not key:
                raise UserError(f"--methods: {method}:{setting}: expected KEY=VALUE")
            check_key(key, f"--methods {method}")
            overrides[method][key] = value.strip()
    if len(methods) < 2:
        raise UserError("--methods: name at least two methods to compare, e.g. lora,adapter")
    return methods, overrides


def format_methods(methods: list[str], overrides: dict[str, dict[str, str]]) -> str:
    """The inverse of parse_methods (what the compiled pipeline's `methods` parameter holds)."""
    parts = []
    for method in methods:
        items = [f"{k}={v}" for k, v in (overrides.get(method) or {}).items()]
        parts.append(method + (":" + ",".join(items) if items else ""))
    return ",".join(parts)


def branch_overrides(
    cfg, method: str, extra: dict[str, str] | None = None
) -> dict[str, tuple[str, str]]:
    """One branch's `--set` overrides in the order they apply: KEY -> (VALUE text, where it
    came from: "published", "recipe" or "command line")."""
    settings: dict[str, tuple[str, str]] = {}
    if method != cfg.method:
        settings.update({k: (repr(v), "published") for k, v in METHOD_DEFAULTS[method].items()})
    for key, value in (cfg.compare.get(method) or {}).items():  # keys checked by RunConfig
        settings[key] = (value if isinstance(value, str) else _yaml_scalar(value), "recipe")
    settings.update({k: (v, "command line") for k, v in (extra or {}).items()})
    return settings


def branch_config(
    recipe_yaml: str, cfg: RunConfig, method: str, extra: dict[str, str] | None = None
):
    """The branch's validated config (the recipe with `method` and branch_overrides applied)
    and those overrides."""
    from ..config import parse_recipe

    settings = branch_overrides(cfg, method, extra)
    sets = [f"method={method}", *(f"{k}={v}" for k, (v, _) in settings.items())]
    return parse_recipe(recipe_yaml, "recipe", sets), settings


def _yaml_scalar(value) -> str:
    import yaml

    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("\n...")
