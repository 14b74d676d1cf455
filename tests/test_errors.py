"""kvpolicy.errors, the one translator from pydantic errors to one-line issues, against messages written out by hand
for the models users write (a policy, a part's parameters, a sweep file), and the import seams of config/registry."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Literal

import pytest
from pydantic import BaseModel, Field, ValidationError, field_validator

from kvpolicy.config import PolicySpec
from kvpolicy.errors import ConfigError, ConfigIssue, issues_from_validation
from kvpolicy.sweep import SweepSpec

ROOT = Path(__file__).resolve().parents[1]


class Params(BaseModel):
    window: int = Field(default=8, ge=1, description="recent tokens")
    mode: Literal["a", "b"] = "a"
    sizes: list[int] = Field(default_factory=list)
    even: int = 2

    @field_validator("even")
    @classmethod
    def _even(cls, v: int) -> int:
        if v % 2:
            raise ValueError("must be even")
        return v


def _lines(model: type[BaseModel] | None, data: dict, **kw) -> list[str]:
    with pytest.raises(ValidationError) as info:
        (model or Params).model_validate(data)
    return [str(i) for i in issues_from_validation(info.value, model, **kw)]


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"ratio": 1.5}, "ratio: 1.5 is out of range; allowed range: [0, 1) — fraction of the cache removed"),
        ({"ratio": "half"}, "ratio: expected float, got 'half' (str)"),
        ({"decode_budget": "x"}, "decode_budget: 'x' is not allowed; allowed values: 'fraction', 'fixed', 'off'"),
        (
            {"encode": 5},
            "encode: expected a part name or a mapping {name: <part>, <parameter>: <value>, ...}, got 5 (int)",
        ),
        ({"encode": {"name": 5}}, "encode.name: expected str, got 5 (int)"),
        (
            {"ratoi": 0.2},
            "ratoi: unknown field (value 0.2); allowed fields: name, preset, encode, decode, reducer, allocator, "
            "ratio, tokens, decode_budget, reference_quirks, sinks, evaluation (did you mean 'ratio'?)",
        ),
    ],
)
def test_policy_fields(data, expected):
    assert _lines(PolicySpec, data) == [expected]


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"window": 0}, "encode.window: 0 is out of range; allowed range: >= 1 — recent tokens"),
        ({"mode": "c"}, "encode.mode: 'c' is not allowed; allowed values: 'a', 'b'"),
        ({"even": 3}, "encode.even: must be even (got 3)"),
        ({"window": "w"}, "encode.window: expected int, got 'w' (str)"),
        ({"sizes": [1, "x"]}, "encode.sizes[1]: input should be a valid integer, unable to parse string as an "
                              "integer, got 'x' (str)"),
    ],
)
def test_part_parameters(data, expected):
    assert _lines(Params, data, prefix="encode", what="parameter") == [expected]


SWEEP = {"name": "s", "policy": {"preset": "elastic"}, "space": {"ratio": [0.1, 0.5]}, "objectives": ["ppl"]}


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"objectives": [{"metric": "ppl", "direction": "down"}]},
         "objectives[0].direction: 'down' is not allowed; allowed values: 'minimize', 'maximize'"),
        ({"sampler": {"nme": "tpe"}},
         "sampler.nme: unknown field (value 'tpe'); allowed fields: name, seed, n_startup_trials, population_size "
         "(did you mean 'name'?)"),
        ({"space": {"ratio": {"type": "float", "lo": 0.1}}},
         "space.ratio.lo: unknown field (value 0.1); allowed fields: type, low, high, step, log, choices, when "
         "(did you mean 'low'?)"),
        ({"space": {}}, "space: must not be empty"),
        ({"policy": 5}, "policy: expected dict[str, Any] | str, got 5 (int)"),
        ({"n_trials": 0}, "n_trials: 0 is out of range; allowed range: >= 1 — finished trials the study should hold"),
        ({"sampler": {"name": "tpee"}},  # a validator's message that names the value is not repeated
         "sampler.name: unknown sampler 'tpee'; allowed samplers: tpe, random, grid, nsgaii (did you mean 'tpe'?)"),
    ],
)
def test_sweep_fields(change, expected):
    assert _lines(SweepSpec, {**SWEEP, **change}) == [expected]


def test_missing_fields_name_their_type():
    assert _lines(SweepSpec, {}) == [
        "name: required (str)",
        "policy: required (dict[str, Any] | str)",
        "space: required (dict[str, SpaceParam])",
        "objectives: required (list[Objective])",
    ]


def test_without_a_model_paths_and_pydantic_messages():
    with pytest.raises(ValidationError) as info:
        Params.model_validate({"window": "w", "even": 3})
    assert [str(i) for i in issues_from_validation(info.value)] == [
        "window: input should be a valid integer, unable to parse string as an integer, got 'w' (str)",
        "even: must be even",
    ]


def test_config_error_lines():
    one = ConfigError(ConfigIssue("ratio", "too big"), "p.yaml")
    assert str(one) == "p.yaml: ratio: too big" and one.paths == ["ratio"]
    two = ConfigError([ConfigIssue("a", "x"), ConfigIssue("", "y")])
    assert str(two) == "2 problems:\n  - a: x\n  - y"


def _kvpolicy_imports(path: Path) -> set[str]:
    """Absolute names of the kvpolicy modules a source file imports (relative imports resolved)."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts).rsplit(".", 1)[0]  # also for __init__.py
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            name = ".".join(base + ([node.module] if node.module else []))
            out |= {name} if node.module else {f"{name}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
    return {m for m in out if m.split(".")[0] == "kvpolicy"}


@pytest.mark.parametrize("name", ["registry.py", "params.py", "errors.py", "hookspecs.py"])
def test_registry_and_descriptions_never_import_config_or_apps(name):
    found = _kvpolicy_imports(ROOT / "kvpolicy" / name)
    bad = {m for m in found if m.split(".")[1] in {"config", "eval", "sweep", "sweep_config", "bench", "cli"}}
    assert not bad, f"kvpolicy/{name} imports {sorted(bad)}"


@pytest.mark.parametrize("path", sorted((ROOT / "kvpolicy" / "config").glob("*.py")), ids=lambda p: p.name)
def test_config_never_imports_the_apps(path):
    bad = {m for m in _kvpolicy_imports(path) if m.split(".")[1] in {"eval", "sweep", "sweep_config", "bench", "cli"}}
    assert not bad, f"kvpolicy/config/{path.name} imports {sorted(bad)}"
