"""Plugin discovery: fake in-process plugins, isolation of broken ones, duplicates, and a real installed package."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import textwrap
import types
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest
import torch
from pydantic import BaseModel, Field

from kvpolicy.config import preset_problems
from kvpolicy.hookspecs import ENTRY_POINT_GROUP, PartSpec, PresetSpec, hookimpl
from kvpolicy.core.policy import LayerView
from kvpolicy.registry import (
    PluginProblem,
    Registry,
    UnknownPartError,
    get_registry,
    param_info,
    reset_registry,
)

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "kvpolicy-example-plugin"


class WindowParams(BaseModel):
    window: int = Field(default=8, ge=1, description="recent tokens always kept")
    mode: str = "mean"


class NoParams(BaseModel):
    pass


def _part(name: str, kind: str = "encode", params: type = NoParams, **kw) -> PartSpec:
    return PartSpec(name=name, kind=kind, params=params, factory=lambda p: object(), summary=f"{name} part", **kw)


def _module(name: str, parts=None, presets=None, parts_raise: Exception | None = None) -> types.ModuleType:
    mod = types.ModuleType(name)
    if parts is not None or parts_raise is not None:

        @hookimpl
        def kvpolicy_parts():
            if parts_raise is not None:
                raise parts_raise
            return parts

        mod.kvpolicy_parts = kvpolicy_parts
    if presets is not None:

        @hookimpl
        def kvpolicy_presets():
            return presets

        mod.kvpolicy_presets = kvpolicy_presets
    return mod


def test_fresh_registry_from_in_process_modules():
    reg = Registry(entry_points=())
    assert reg.parts() == [] and reg.problems == []
    reg.register_module(
        _module("good_a", parts=[_part("alpha", params=WindowParams), _part("evict", "reducer")]), source="pkg-a"
    )
    reg.register_module(
        _module("good_b", parts=[_part("beta", "decode")], presets=[PresetSpec("p1", "a preset", {"encode": "alpha"})]),
        source="pkg-b",
    )
    assert reg.problems == []
    spec, source = reg.part("encode", "alpha")
    assert spec.name == "alpha" and source == "pkg-a"
    assert reg.part("decode", "beta").source == "pkg-b"
    assert reg.names("reducer") == ["evict"]
    assert [p.spec.name for p in reg.parts()] == ["alpha", "beta", "evict"]
    assert list(reg.presets()) == ["p1"] and reg.presets()["p1"].source == "pkg-b"
    assert reg.presets()["p1"].spec.policy == {"encode": "alpha"}


def test_unknown_part_lists_available_names():
    reg = Registry(entry_points=())
    reg.register_module(_module("m", parts=[_part("anchor_merge", "reducer"), _part("evict", "reducer")]), source="x")
    with pytest.raises(UnknownPartError) as info:
        reg.part("reducer", "anchr_merge")
    msg = str(info.value)
    assert "anchr_merge" in msg and "anchor_merge, evict" in msg and "did you mean 'anchor_merge'" in msg
    with pytest.raises(UnknownPartError, match="available: anchor_merge, evict"):
        reg.part("reducer", "nope")
    with pytest.raises(UnknownPartError, match="preset"):
        reg.preset("nope")


def test_hook_that_raises_is_isolated():
    reg = Registry(entry_points=())
    reg.register_module(_module("ok_mod", parts=[_part("ok")]), source="ok-pkg")
    problems = reg.register_module(
        _module("raising_mod", parts_raise=RuntimeError("boom"), presets=[PresetSpec("bad", "s", {})]),
        source="raising-pkg",
    )
    assert len(problems) == 1 and problems[0] in reg.problems
    problem = problems[0]
    assert problem.plugin == "raising_mod" and problem.package == "raising-pkg"
    assert "boom" in problem.error and "kvpolicy_parts" in problem.error
    assert reg.names("encode") == ["ok"]
    assert "bad" not in reg.presets()  # a plugin whose hook raises contributes nothing
    reg.register_module(_module("later_mod", parts=[_part("later")]), source="later-pkg")
    assert reg.names("encode") == ["later", "ok"]


@pytest.mark.parametrize(
    "bad, fragment",
    [
        ("not a part", "not a PartSpec"),
        (PartSpec("p", "encode", dict, lambda p: p, "s"), "params must be a pydantic BaseModel"),  # type: ignore[arg-type]
        (PartSpec("p", "scorer", NoParams, lambda p: p, "s"), "kind 'scorer' is not one of"),  # type: ignore[arg-type]
        (PartSpec("p", "encode", NoParams, "nope", "s"), "factory is not callable"),  # type: ignore[arg-type]
        (PartSpec("p", "encode", NoParams, lambda p: p, "s", provides="scores"), "provides"),  # type: ignore[arg-type]
    ],
)
def test_malformed_part_is_reported_and_skipped(bad, fragment):
    reg = Registry(entry_points=())
    problems = reg.register_module(_module("mixed", parts=[_part("fine"), bad]), source="mixed-pkg")
    assert len(problems) == 1
    assert problems[0].plugin == "mixed" and problems[0].package == "mixed-pkg"
    assert fragment in problems[0].error
    assert reg.names("encode") == ["fine"]  # the well-formed part of the same plugin still loads


def test_hook_returning_non_list_and_missing_hookimpl():
    reg = Registry(entry_points=())
    single = _module("single", parts=_part("x"))  # a PartSpec, not a list
    assert "must return a list" in reg.register_module(single, source="s")[0].error
    plain = types.ModuleType("plain")
    plain.kvpolicy_parts = lambda: [_part("y")]  # forgot @hookimpl
    assert "no @hookimpl" in reg.register_module(plain, source="p")[0].error
    typo = types.ModuleType("typo")
    typo.kvpolicy_part = hookimpl(lambda: ["x"])  # misspelt hook
    assert "unknown hook" in reg.register_module(typo, source="t")[0].error
    assert reg.parts() == []


def test_duplicate_names():
    reg = Registry(entry_points=())
    reg.register_module(_module("first", parts=[_part("same"), _part("same", "decode")]), source="pkg-one")
    problems = reg.register_module(_module("second", parts=[_part("same"), _part("other")]), source="pkg-two")
    assert len(problems) == 1
    assert "already provided by package 'pkg-one'" in problems[0].error and problems[0].package == "pkg-two"
    assert reg.part("encode", "same").source == "pkg-one"  # first registration wins
    assert reg.part("decode", "same").source == "pkg-one"  # same name, other kind: fine
    assert reg.part("encode", "other").source == "pkg-two"  # the rest of the plugin loads
    # the same package contributing a name twice is reported too
    problems = reg.register_module(
        _module("third", parts=[_part("twice"), _part("twice", params=WindowParams)]), source="pkg-three"
    )
    assert "contributed twice" in problems[0].error


def test_entry_point_whose_import_fails(tmp_path, monkeypatch):
    (tmp_path / "kvp_test_good_plugin.py").write_text(
        textwrap.dedent(
            """
            from pydantic import BaseModel
            from kvpolicy.hookspecs import PartSpec, hookimpl

            class P(BaseModel):
                pass

            @hookimpl
            def kvpolicy_parts():
                return [PartSpec("good_from_file", "encode", P, lambda p: p, "a part loaded from a file")]
            """
        )
    )
    (tmp_path / "kvp_test_broken_plugin.py").write_text("import this_module_does_not_exist_kvp\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    eps = [
        EntryPoint("broken", "kvp_test_broken_plugin", ENTRY_POINT_GROUP),
        EntryPoint("good", "kvp_test_good_plugin", ENTRY_POINT_GROUP),
    ]
    reg = Registry(entry_points=eps)
    assert reg.names("encode") == ["good_from_file"]
    assert len(reg.problems) == 1
    problem = reg.problems[0]
    assert problem.plugin == "broken" and "this_module_does_not_exist_kvp" in problem.error
    assert "broken" in str(problem)
    # with an explicit source package
    reg2 = Registry(entry_points=())
    (p,) = reg2.load_entry_point(EntryPoint("broken", "kvp_test_broken_plugin", ENTRY_POINT_GROUP), source="brk-pkg")
    assert p == PluginProblem("broken", "brk-pkg", p.error) and "import of" in p.error
    # a module path that cannot be imported at all
    (p,) = reg2.load_module("no_such_kvp_module", source="x")
    assert "no_such_kvp_module" in p.error


def test_param_info_and_listing():
    info = {p.name: p for p in param_info(WindowParams)}
    assert info["window"].type == "int" and info["window"].default == 8 and info["window"].range == ">= 1"
    assert info["window"].description == "recent tokens always kept"
    reg = Registry(entry_points=())
    reg.register_module(
        _module(
            "m",
            parts=[_part("w", params=WindowParams), _part("evict", "reducer")],
            presets=[PresetSpec("ok", "fine", {"encode": "w"}), PresetSpec("broken", "bad", {"encode": "missing"})],
        ),
        source="pkg",
    )
    data = reg.listing(preset_problems(reg))
    json.dumps(data)  # serialisable
    assert {p["name"] for p in data["parts"]} == {"w", "evict"}
    status = {p["name"]: p["status"] for p in data["presets"]}
    assert status["ok"] == "ok" and "unknown encode scorer 'missing'" in status["broken"]


def test_get_registry_is_cached_and_resettable():
    reset_registry()
    try:
        first = get_registry()
        assert get_registry() is first
        assert get_registry(refresh=True) is not first
        fake = Registry(entry_points=())
        reset_registry(fake)
        assert get_registry() is fake
    finally:
        reset_registry()


# ------------------------------------------------------------------------------------------ the example plugin
def _load_example_module():
    path = EXAMPLE / "src" / "kvpolicy_example_plugin" / "__init__.py"
    spec = importlib.util.spec_from_file_location("kvpolicy_example_plugin_inprocess", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_scorer_in_process():
    module = _load_example_module()
    reg = Registry(entry_points=())
    assert reg.register_module(module, source="kvpolicy-example-plugin") == []
    spec, source = reg.part("encode", "key_norm_example")
    assert source == "kvpolicy-example-plugin" and list(spec.params.model_fields) == ["sinks"]
    scorer = spec.factory(spec.params(sinks=1))
    B, H, P, D = 1, 2, 5, 4
    keys = torch.ones(B, H, P, D)
    keys[:, :, 2] *= 0.1  # lowest norm
    keys[:, :, 4] *= 3.0  # highest norm
    view = LayerView(
        layer_idx=0,
        num_layers=1,
        stage="prefill",
        keys=keys,
        values=torch.zeros_like(keys),
        valid=torch.ones(B, H, P, dtype=torch.bool),
        positions=torch.arange(P).expand(B, H, P).clone(),
        seen=P,
        n_tokens=torch.tensor([P]),
        new_tokens=P,
        token_types=torch.zeros(B, H, P, dtype=torch.int8),
    )
    scores = scorer.score(view)
    assert scores.shape == (B, 1, P)
    order = scores[0, 0].argsort(descending=True).tolist()
    assert order[0] == 0  # sink
    assert order[1] == 2 and order[-1] == 4


@pytest.fixture
def installed_example(tmp_path):
    """Install the example plugin (a copy, so the source folder gets no build artefacts); uninstall afterwards."""
    if importlib.util.find_spec("setuptools") is None:
        pytest.skip("setuptools is needed to build the example plugin without network")
    src = tmp_path / "kvpolicy-example-plugin"
    shutil.copytree(EXAMPLE, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    pip = [sys.executable, "-m", "pip"]
    done = subprocess.run(
        [*pip, "install", "--no-deps", "--no-build-isolation", "--no-index", "--quiet", str(src)],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )
    try:
        assert done.returncode == 0, done.stdout + done.stderr
        yield
    finally:
        subprocess.run(
            [*pip, "uninstall", "--yes", "--quiet", "kvpolicy-example-plugin"],
            check=False,
            capture_output=True,
            timeout=300,
        )


def test_example_plugin_is_discovered_when_installed(installed_example, tmp_path):
    # a fresh process, so discovery goes through the installed entry point (not a direct import)
    done = subprocess.run(
        [sys.executable, "-m", "kvpolicy.cli", "plugins", "--json"],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    found = [p for p in data["parts"] if p["name"] == "key_norm_example"]
    assert len(found) == 1, data
    part = found[0]
    assert part["source"] == "kvpolicy-example-plugin" and part["kind"] == "encode"
    assert [p["name"] for p in part["params"]] == ["sinks"]
    assert not [p for p in data["problems"] if p["package"] == "kvpolicy-example-plugin"]
