"""Where things live (components/methods/, architectures/, objectives/, planner/): each seam
holds what it names and nothing outside it reaches around it. These read the source itself,
so a change that branches on a method name elsewhere, or a planner module that imports the
worker, fails here."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from .conftest import REPO

SOURCES = sorted(
    p for root in ("components", "pipelines") for p in (REPO / root).rglob("*.py")
)  # fmt: skip
METHOD_BRANCH = re.compile(r"\.method\s*(==|!=|\bin\b|\bnot in\b)")
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 450, 80


def relative(path: Path) -> str:
    return str(path.relative_to(REPO))


def test_no_branch_on_the_method_outside_methods():
    """`cfg.method == "full"` and kin live in components/methods/ only: everything else asks
    the method (method_of(cfg).trains_base, .quantized_base, ...)."""
    branches = [
        f"{relative(path)}:{n}: {line.strip()}"
        for path in SOURCES
        if "components/methods/" not in relative(path)
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if METHOD_BRANCH.search(line)
    ]
    assert branches == []


def test_the_grep_finds_a_branch():
    """The pattern above is not vacuous: it finds the branches it is meant to find."""
    for line in ('if cfg.method == "qlora":', "x = setup.method in ('lora',)", "a.method != b"):
        assert METHOD_BRANCH.search(line), line
    assert not METHOD_BRANCH.search("method = method_of(cfg)")


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, as dotted names relative to the kubetune package."""
    package = ["components", *path.relative_to(REPO / "components").parts[:-1]]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                found.add(".".join([*base, *(node.module or "").split(".")]).rstrip("."))
            elif node.module:
                found.add(node.module.removeprefix("kubetune."))
        elif isinstance(node, ast.Import):
            found.update(alias.name.removeprefix("kubetune.") for alias in node.names)
    return found


@pytest.mark.parametrize("seam", ["planner", "methods", "architectures", "objectives"])
def test_the_planner_and_the_seams_do_not_import_the_worker(seam):
    """The planner reads methods and architectures, never the worker (components/train/):
    `kubetune plan` needs no training code. Methods, architectures and objectives import the
    worker's helpers only lazily, inside the functions the worker calls."""
    for path in sorted((REPO / "components" / seam).glob("*.py")):
        tree = ast.parse(path.read_text())
        top_level = [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)]
        for node in top_level if seam != "planner" else ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level and node.module:
                assert not node.module.startswith("train"), f"{relative(path)}: {node.module}"
    if seam == "planner":
        for path in sorted((REPO / "components" / "planner").glob("*.py")):
            assert not any(m.startswith("components.train") for m in imported_modules(path))


def test_modules_and_functions_stay_small():
    """No module over 450 lines and no function over 80: a newcomer reads one screenful at a
    time."""
    too_long = []
    for path in SOURCES:
        text = path.read_text()
        if len(text.splitlines()) > MAX_MODULE_LINES:
            too_long.append(f"{relative(path)}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    too_long.append(f"{relative(path)}:{node.lineno} {node.name}: {length} lines")
    assert too_long == []


def test_every_registered_method_implements_the_interface():
    """A method module overrides what has no default (adapt, count) and says what its output
    is; the recipe's `method` accepts exactly the registered names."""
    from typing import get_args

    from kubetune.components.config import RunConfig
    from kubetune.components.methods import REGISTRY, Method

    assert set(get_args(RunConfig.model_fields["method"].annotation)) == set(REGISTRY)
    for name, method in REGISTRY.items():
        assert method.name == name and method.kind is not None
        for hook in ("adapt", "count"):
            assert getattr(type(method), hook) is not getattr(Method, hook), (name, hook)


def test_every_family_record_is_consistent():
    """Each model type has one record; a record's shipped configs are of its own types and its
    tiny builders build configs of its types; an unknown type gets the generic record, which
    says which fast paths it lacks."""
    from kubetune.components.architectures import FAMILIES, GENERIC, family, family_note

    seen: set[str] = set()
    for record in FAMILIES:
        assert not seen & set(record.model_types), record.name
        seen |= set(record.model_types)
        for hub_id, config in record.configs.items():
            assert config["model_type"] in record.model_types, hub_id
        for name, build in record.tiny.items():
            assert build().model_type in record.model_types, name
    assert family("some_new_arch") is GENERIC
    assert "Liger's fused kernels" in GENERIC.lacks() and GENERIC.lora_targets is None
    note = family_note("some_new_arch")
    assert note is not None and "generic" in note and "LLaMA-Adapter" in note
    assert family_note("llama") is None and family_note("falcon") is None
