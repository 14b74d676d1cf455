"""The engine package kvpolicy/core/: its import rules, sizes, and the stable plugin API modules that re-export it."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORE_DIR = ROOT / "kvpolicy" / "core"
#: the apps built on the core: the core never imports them
APPS = ("kvpolicy.eval", "kvpolicy.sweep", "kvpolicy.bench", "kvpolicy.cli", "kvpolicy.config", "kvpolicy.registry")

#: every public name kvpolicy.policy / kvpolicy.selection offers (those offered before the engine moved into
#: kvpolicy/core/, and LOGIT_BIAS since)
PLUGIN_API = {
    "kvpolicy.policy": (
        "GENERATED IMAGE LOGIT_BIAS TEXT AttentionStat Budget BudgetAllocator CachePolicy DecodeScorer EncodeScorer "
        "LayerView "
        "ModelView Need Probe ProbeChunk ProbeStat QueryStat Reducer Reduction Stage part_sinks"
    ).split(),
    "kvpolicy.selection": ["lowest_slot", "ranked_slots", "select_top", "sort_by_position"],
}


def _core_modules() -> dict[str, Path]:
    out = {}
    for path in sorted(CORE_DIR.glob("*.py")):
        name = "kvpolicy.core" if path.stem == "__init__" else f"kvpolicy.core.{path.stem}"
        out[name] = path
    return out


def _imports(name: str, path: Path) -> list[tuple[str, list[str]]]:
    """(absolute module, imported names) of every import statement of a core module."""
    package = name if path.stem == "__init__" else name.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else [])) if node.level else node.module or ""
            out.append((module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            out.extend((a.name, []) for a in node.names)
    return out


def _graph() -> dict[str, set[str]]:
    modules = _core_modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps = set()
        for module, names in _imports(name, path):
            deps |= {module} & set(modules)
            deps |= {f"{module}.{n}" for n in names} & set(modules)
        graph[name] = deps - {name}
    return graph


def test_core_imports_none_of_the_apps():
    for name, path in _core_modules().items():
        bad = [m for m, _ in _imports(name, path) if m.startswith(APPS)]
        assert not bad, f"{name} imports {bad}: the apps build on the core, not the other way round"


def test_core_has_no_import_cycle():
    graph = _graph()
    done: set[str] = set()

    def visit(node: str, stack: list[str]) -> None:
        if node in stack:
            raise AssertionError(f"import cycle: {' -> '.join(stack[stack.index(node):] + [node])}")
        if node in done:
            return
        for dep in sorted(graph[node]):
            visit(dep, stack + [node])
        done.add(node)

    for node in sorted(graph):
        visit(node, [])
    assert graph["kvpolicy.core.kernels"] == set()  # the sanity of the walk: kernels are pure tensor code


def test_core_modules_and_functions_are_small_and_import_no_private_name():
    for name, path in _core_modules().items():
        source = path.read_text()
        assert len(source.splitlines()) <= 600, f"{name} has {len(source.splitlines())} lines"
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                assert length <= 80, f"{name}.{node.name} has {length} lines"
        private = [(m, n) for m, names in _imports(name, path) for n in names if n.startswith("_")]
        assert not private, f"{name} imports private names {private}"


def test_core_reads_no_private_attribute_of_another_core_object():
    """Only ``self._x`` (and transformers' ``config._attn_implementation``, its own config field): a layer's state is
    read through its public read-only properties."""
    allowed = {"_attn_implementation"}  # transformers has no public reader of a config's attention implementation
    # torch has no public name for SDPA's CPU flash kernel (the one call that returns the log-sum-exp with outputs
    # equal to SDPA's) nor for the backend SDPA would pick for given arguments (kvpolicy/core/sdpa.py)
    allowed |= {"_scaled_dot_product_flash_attention_for_cpu", "_fused_sdp_choice"}
    for name, path in _core_modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                owner = node.value.id if isinstance(node.value, ast.Name) else None
                assert owner == "self" or node.attr in allowed, f"{name}:{node.lineno} reads .{node.attr} of {owner}"


@pytest.mark.parametrize("module", sorted(PLUGIN_API))
def test_stable_plugin_api_re_exports_the_core(module):
    """Third-party plugins import kvpolicy.policy and kvpolicy.selection: every name they offered is still there and
    is the core's object (one class, so isinstance checks and protocols agree)."""
    stable = importlib.import_module(module)
    core = importlib.import_module(module.replace("kvpolicy.", "kvpolicy.core.", 1))
    assert sorted(stable.__all__) == sorted(PLUGIN_API[module])
    for name in PLUGIN_API[module]:
        assert getattr(stable, name) is getattr(core, name), name


def test_package_names_resolve_to_the_core():
    import kvpolicy
    import kvpolicy.core.cache
    import kvpolicy.core.layer

    assert kvpolicy.PolicyLayer is kvpolicy.core.layer.PolicyLayer
    assert kvpolicy.PolicyCache is kvpolicy.core.cache.PolicyCache
    assert kvpolicy.Budget is importlib.import_module("kvpolicy.policy").Budget


def test_package_static_imports_name_what_the_lazy_loader_serves():
    """kvpolicy/__init__.py names its API twice by necessity: imports under ``TYPE_CHECKING`` (for type checkers and
    IDEs, never run) and the table the lazy loader reads. Both must list the same names, each from the same module."""
    import kvpolicy

    tree = ast.parse((ROOT / "kvpolicy" / "__init__.py").read_text())
    block = next(n for n in tree.body if isinstance(n, ast.If) and getattr(n.test, "id", None) == "TYPE_CHECKING")
    static = {alias.name: node.module for node in block.body for alias in node.names}
    assert sorted(static) == sorted(kvpolicy.__all__)
    for name, module in static.items():
        assert getattr(kvpolicy, name) is getattr(importlib.import_module(f"kvpolicy.{module}"), name), name
