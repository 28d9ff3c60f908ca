"""The package's layers, read from its source with `ast`: imports point down, and the core is pure.

core (stdlib only) <- model (torch & co. inside functions, never pytest) <- plugin (the pytest door);
integrations sit beside the plugin and never import it. No import cycle among the modules' top-level
imports. ruff's TID253 keeps the heavy libraries out of module level; this test keeps the layers.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest_lora

PACKAGE = Path(pytest_lora.__file__).parent
# tomllib's backport, imported by core.settings on Python 3.10 only (`import tomli as tomllib`)
STDLIB = {*sys.stdlib_module_names, "tomli"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _targets(node: ast.Import | ast.ImportFrom, module: str) -> Iterator[str]:
    """The modules an import statement loads (`from pkg import sub` loads `pkg.sub` when it is a module)."""
    if isinstance(node, ast.Import):
        yield from (alias.name for alias in node.names)
        return
    base = node.module or ""
    if node.level:
        package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
        for _ in range(node.level - 1):
            package = package.rpartition(".")[0]
        base = f"{package}.{base}" if base else package
    for alias in node.names:
        if f"{base}.{alias.name}" in MODULES:
            yield f"{base}.{alias.name}"
        elif base == "pytest_lora" and alias.name in pytest_lora._WHERE:  # a public name: the module it loads
            yield pytest_lora._WHERE[alias.name]
        else:
            yield base


def imports(module: str, *, top_level_only: bool) -> set[str]:
    """What `module` imports: everywhere (functions too), or only what runs when it is imported."""
    tree = ast.parse(MODULES[module].read_text(), str(MODULES[module]))
    found: set[str] = set()

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                found.update(_targets(node, module))
            elif isinstance(node, ast.If):
                if not _is_type_checking(node):
                    visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                for block in (node.body, node.orelse, node.finalbody, *(h.body for h in node.handlers)):
                    visit(block)
            elif not top_level_only:
                visit([child for child in ast.iter_child_nodes(node) if isinstance(child, ast.stmt)])

    if top_level_only:
        visit(tree.body)
    else:
        found.update(
            target
            for node in ast.walk(tree)
            if isinstance(node, (ast.Import, ast.ImportFrom))
            for target in _targets(node, module)
        )
    return found


def layer(module: str) -> str:
    """The layer's folder; "" for the public door (`pytest_lora`, and public modules beside it: `strategies`)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and MODULES[module].parent != PACKAGE else ""


def _in(target: str, package: str) -> bool:
    return target == package or target.startswith(f"{package}.")


def test_every_module_is_in_a_layer() -> None:
    assert {layer(m) for m in MODULES} == {"", "core", "model", "plugin", "integrations"}


def test_core_imports_only_the_stdlib_and_the_core() -> None:
    bad = {
        module: sorted(
            target
            for target in imports(module, top_level_only=False)
            if not _in(target, "pytest_lora.core") and target.partition(".")[0] not in STDLIB
        )
        for module in MODULES
        if layer(module) == "core"
    }
    assert not {module: targets for module, targets in bad.items() if targets}


def test_model_never_imports_pytest_the_plugin_or_the_integrations() -> None:
    banned = ("pytest", "_pytest", "pytest_lora.plugin", "pytest_lora.integrations")
    bad = {
        module: sorted(t for t in imports(module, top_level_only=False) if any(_in(t, b) for b in banned))
        for module in MODULES
        if layer(module) == "model"
    }
    assert not {module: targets for module, targets in bad.items() if targets}


def test_integrations_never_import_the_plugin() -> None:
    bad = {
        module: sorted(t for t in imports(module, top_level_only=False) if _in(t, "pytest_lora.plugin"))
        for module in MODULES
        if layer(module) == "integrations"
    }
    assert not {module: targets for module, targets in bad.items() if targets}


def test_no_import_cycle_among_the_modules() -> None:
    graph = {
        module: {t for t in imports(module, top_level_only=True) if t in MODULES and t != module} for module in MODULES
    }
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def walk(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                cycles.append([*path[path.index(target) :], target])
            elif target not in state:
                walk(target, [*path, target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            walk(module, [module])
    assert not cycles


def test_xdist_is_read_in_the_plugin_and_handed_to_the_model_side() -> None:
    """The model side never reads xdist's environment; the plugin reads `workerinput` and passes a Worker."""
    from types import SimpleNamespace

    from pytest_lora.core.settings import Worker
    from pytest_lora.plugin.xdist import worker

    loading = (PACKAGE / "model" / "loading.py").read_text()
    assert "PYTEST_XDIST" not in loading and "workerinput" not in loading
    assert worker(SimpleNamespace()) is None  # type: ignore[arg-type]
    config = SimpleNamespace(workerinput={"workerid": "gw3", "workercount": 4})
    assert worker(config) == Worker(3, 4)  # type: ignore[arg-type]
