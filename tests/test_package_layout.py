"""Issue-14 rules for the whole package, read from the source with ast: the folder tree is the architecture.

* no import cycle among the modules of ``kvpolicy/`` and ``plugins/`` (imports inside functions count: a lazy import
  is still a dependency);
* the engine (``kvpolicy/core/``) imports nothing from the apps built on it (eval, sweep, bench, cli);
* no module over 600 lines, no function over 80;
* no ``_private`` name imported from another module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
APPS = ("kvpolicy.eval", "kvpolicy.sweep", "kvpolicy.bench", "kvpolicy.cli")


def _modules() -> dict[str, Path]:
    out = {}
    for folder, package in (("kvpolicy", "kvpolicy"), ("plugins", "kvpolicy_plugins")):
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = [package, *path.relative_to(ROOT / folder).with_suffix("").parts]
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> list[tuple[str, list[str]]]:
    """(absolute module, imported names) of every import statement, relative ones resolved."""
    package = name if path.stem == "__init__" else name.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([module] if module else []))
            out.append((module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            out.extend((a.name, []) for a in node.names)
    return out


def _graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports (``from pkg import sub`` depends on ``pkg.sub``, not on ``pkg``)."""
    graph = {}
    for name, path in MODULES.items():
        deps: set[str] = set()
        for module, names in _imports(name, path):
            subs = {f"{module}.{n}" for n in names} & MODULES.keys()
            deps |= subs
            if module in MODULES and (not names or len(subs) < len(names)):
                deps.add(module)
        graph[name] = deps - {name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_cycle_finder_finds_a_cycle():
    """The check below can fail: a two-module and a three-module cycle beside an acyclic part are both reported."""
    graph = {"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": {"e"}, "e": {"c"}, "f": {"a"}}
    assert sorted(_cycles(graph)) == [["a", "b"], ["c", "d", "e"]]


def test_no_import_cycle():
    assert _cycles(_graph()) == []


def test_the_engine_imports_none_of_the_apps():
    for name, path in MODULES.items():
        if name.startswith("kvpolicy.core"):
            bad = [m for m, _ in _imports(name, path) if m.startswith(APPS)]
            assert not bad, f"{name} imports {bad}: the apps build on the engine, not the other way round"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_modules_and_functions_are_small(name):
    source = MODULES[name].read_text()
    assert len(source.splitlines()) <= 600, f"{name}: {len(source.splitlines())} lines"
    long = [
        f"{node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for node in ast.walk(ast.parse(source))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 80
    ]
    assert not long, f"{name}: {long}"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_private_name_is_imported_from_another_module(name):
    private = [
        f"{module}.{n}"
        for module, names in _imports(name, MODULES[name])
        for n in names
        if n.startswith("_") and not n.startswith("__")
    ]
    assert not private, f"{name} imports {private}"
