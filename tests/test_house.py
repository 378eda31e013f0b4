"""The shape of the served package, measured over `camserve/` with `ast`, so that the house stays as
docs/development.md describes it: no import cycles, no private imports (in `camtools/` too), no branch on a
task's kind or a method's family outside the module that owns it, and modules and functions small enough to read.

`python tests/test_house.py` prints the figures."""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "camserve"
TOOLS = ROOT / "camtools"
"""The build and dev tools: no cycles and no private imports there either."""
TASK_MODULES = ("camserve.tasks",)  # the one place that may know which task is which
METHOD_MODULES = ("camserve.cam.methods",)  # the one place that may know a method's family
TASK_NAMES = {"multiclass", "multilabel", "binary", "regression", "detection", "segmentation"}

MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60


def modules(package: Path = PACKAGE) -> dict[str, Path]:
    found = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _resolve(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(module: str, path: Path, known: dict[str, Path]) -> Iterator[tuple[str, str]]:
    """(imported module, imported name or '') for every import in the module, inside functions too."""
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, ""
        elif isinstance(node, ast.ImportFrom):
            source = _resolve(module, node, is_package)
            for alias in node.names:
                whole = f"{source}.{alias.name}"
                yield (whole, "") if whole in known else (source, alias.name)


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    known = modules(package)
    graph: dict[str, set[str]] = {name: set() for name in known}
    for name, path in known.items():
        for target, _ in imports(name, path, known):
            if target in known and target != name:
                graph[name].add(target)
    return graph


def cycles(package: Path = PACKAGE) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    graph = import_graph(package)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in graph[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def private_imports(package: Path = PACKAGE) -> list[str]:
    known = modules(package)
    found = []
    for name, path in known.items():
        for source, imported in imports(name, path, known):
            if imported.startswith("_") and not imported.startswith("__") and source != name:
                found.append(f"{name}: {source}.{imported}")
    return found


def _outside(name: str, owners: tuple[str, ...]) -> bool:
    return not any(name == owner or name.startswith(owner + ".") for owner in owners)


def _mentions(node: ast.AST, test) -> bool:
    return any(test(part) for part in ast.walk(node))


def _is_task_kind(node: ast.AST) -> bool:
    if isinstance(node, ast.Constant) and node.value in TASK_NAMES:
        return True
    return isinstance(node, ast.Attribute) and node.attr == "kind"


def _is_family(node: ast.AST) -> bool:
    return isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "Family"


def comparisons(test, owners: tuple[str, ...]) -> list[str]:
    """Comparisons (==, !=, in, is, match) in which one side passes ``test``, outside the owning modules."""
    found = []
    for name, path in modules().items():
        if not _outside(name, owners):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            sides: list[ast.AST] = []
            if isinstance(node, ast.Compare):
                sides = [node.left, *node.comparators]
            elif isinstance(node, ast.match_case):
                sides = [node.pattern]
            if any(_mentions(side, test) for side in sides):
                found.append(f"{name}:{node.lineno if hasattr(node, 'lineno') else node.pattern.lineno}")
    return found


def task_comparisons() -> list[str]:
    return comparisons(_is_task_kind, TASK_MODULES)


def family_uses() -> list[str]:
    """Any use of ``Family.X`` outside the methods package: a consumer asks the record, never its family."""
    found = []
    for name, path in modules().items():
        if _outside(name, METHOD_MODULES):
            found += [f"{name}:{node.lineno}" for node in ast.walk(ast.parse(path.read_text())) if _is_family(node)]
    return found


def module_lengths() -> dict[str, int]:
    return {name: len(path.read_text().splitlines()) for name, path in modules().items()}


def function_lengths() -> dict[str, int]:
    lengths = {}
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lengths[f"{name}.{node.name}:{node.lineno}"] = node.end_lineno - node.lineno + 1
    return lengths


def figures() -> dict[str, object]:
    longest_module = max(module_lengths().items(), key=lambda item: item[1])
    longest_function = max(function_lengths().items(), key=lambda item: item[1])
    return {
        "import cycles": cycles(),
        "private imports": private_imports(),
        "task comparisons outside the tasks": task_comparisons(),
        "Family outside cam/methods": family_uses(),
        "longest module": longest_module,
        "longest function": longest_function,
    }


@pytest.mark.parametrize("package", [PACKAGE, TOOLS], ids=lambda package: package.name)
def test_no_import_cycle_between_modules(package):
    assert cycles(package) == []


@pytest.mark.parametrize("package", [PACKAGE, TOOLS], ids=lambda package: package.name)
def test_no_module_imports_another_modules_private_names(package):
    assert private_imports(package) == []


def test_only_the_task_module_asks_which_task_it_is():
    assert task_comparisons() == []


def test_only_the_methods_package_knows_a_methods_family():
    assert family_uses() == []


def test_modules_and_functions_stay_small():
    assert {name: n for name, n in module_lengths().items() if n > MAX_MODULE_LINES} == {}
    assert {name: n for name, n in function_lengths().items() if n > MAX_FUNCTION_LINES} == {}


def test_the_figures_see_what_they_count(tmp_path):
    """Each figure finds a planted case: a cycle, a private import, a task's kind and a family compared."""
    source = ast.parse(
        "from camserve.cam.engine import _gather\n"
        "if task.kind == 'detection' or method.family is Family.COMPOSITE:\n    pass\n"
    )
    compares = [node for node in ast.walk(source) if isinstance(node, ast.Compare)]
    assert any(_mentions(node, _is_task_kind) for node in compares)
    assert any(_mentions(node, _is_family) for node in compares)
    imported = next(node for node in ast.walk(source) if isinstance(node, ast.ImportFrom))
    assert _resolve("camserve.pipeline", imported, False) == "camserve.cam.engine"
    assert imported.names[0].name.startswith("_")


if __name__ == "__main__":
    for key, value in figures().items():
        shown = value if not isinstance(value, list) else f"{len(value)}: {value}"
        print(f"{key}: {shown}", file=sys.stdout)
