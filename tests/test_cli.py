"""The command line: ``kvpolicy plugins`` and ``kvpolicy plugins --json`` on a registry of test parts."""

from __future__ import annotations

import json
import types

import pytest
from pydantic import BaseModel, Field
from typer.testing import CliRunner

from kvpolicy import cli
from kvpolicy.hookspecs import PartSpec, PresetSpec, hookimpl
from kvpolicy.registry import Registry, reset_registry


class OffsetParams(BaseModel):
    offset: int = Field(default=-25, description="drop index relative to the end of the prompt")
    ratio_hint: float = Field(default=0.5, ge=0, lt=1)


class NoParams(BaseModel):
    pass


@pytest.fixture
def registry():
    good = types.ModuleType("cli_test_parts")
    good.kvpolicy_parts = hookimpl(
        lambda: [
            PartSpec("distance_test", "decode", OffsetParams, lambda p: p, "drop by distance (test part)"),
            PartSpec("evict", "reducer", NoParams, lambda p: p, "keep the top-scored (test part)"),
            "not a part",
        ]
    )
    good.kvpolicy_presets = hookimpl(
        lambda: [
            PresetSpec("dist_preset", "distance only", {"decode": "distance_test", "ratio": 0.2}),
            PresetSpec("broken_preset", "names a missing part", {"encode": "missing_scorer"}),
        ]
    )
    broken = types.ModuleType("cli_test_broken")

    def fail():
        raise ImportError("plugin exploded")

    broken.kvpolicy_parts = hookimpl(fail)
    reg = Registry(entry_points=())
    reg.register_module(good, source="cli-test-pkg")
    reg.register_module(broken, source="broken-pkg")
    reset_registry(reg)
    cli._warned = False
    yield reg
    reset_registry()
    cli._warned = False


def test_plugins_table(registry):
    result = CliRunner().invoke(cli.app, ["plugins"], env={"COLUMNS": "400"})  # wide enough not to wrap cells
    assert result.exit_code == 0, result.output
    out = result.stdout
    for text in (
        "distance_test",
        "cli-test-pkg",
        "decode",
        "offset: int = -25",
        "ratio_hint: float = 0.5 in [0, 1)",
        "drop by distance",
        "evict",
        "dist_preset",
        "distance only",
        "broken_preset",
        "missing_scorer",
    ):
        assert text in out, text
    # problems appear in the listing and as warnings
    assert "cli_test_broken" in out and "broken-pkg" in out and "plugin exploded" in out
    assert "not a PartSpec" in out
    assert "warning" in result.stderr and "plugin exploded" in result.stderr


def test_plugins_json(registry):
    result = CliRunner().invoke(cli.app, ["plugins", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)  # stdout is pure JSON; warnings go to stderr
    parts = {p["name"]: p for p in data["parts"]}
    assert set(parts) == {"distance_test", "evict"}
    dist = parts["distance_test"]
    assert dist["source"] == "cli-test-pkg" and dist["kind"] == "decode" and dist["stage"] == "decode"
    assert dist["summary"] == "drop by distance (test part)" and dist["status"] == "ok"
    offset = {p["name"]: p for p in dist["params"]}["offset"]
    assert offset == {
        "name": "offset",
        "type": "int",
        "required": False,
        "default": -25,
        "range": None,
        "choices": None,
        "description": "drop index relative to the end of the prompt",
    }
    assert {p["name"]: p for p in dist["params"]}["ratio_hint"]["range"] == "[0, 1)"
    presets = {p["name"]: p for p in data["presets"]}
    assert presets["dist_preset"]["status"] == "ok" and presets["dist_preset"]["source"] == "cli-test-pkg"
    assert presets["broken_preset"]["status"].startswith("invalid:")
    problems = {(p["plugin"], p["package"]) for p in data["problems"]}
    assert ("cli_test_broken", "broken-pkg") in problems and ("cli_test_parts", "cli-test-pkg") in problems
    assert "plugin exploded" in result.stderr


def test_warning_printed_once(registry):
    runner = CliRunner()
    first = runner.invoke(cli.app, ["plugins", "--json"])
    second = runner.invoke(cli.app, ["plugins", "--json"])
    assert "plugin exploded" in first.stderr and "plugin exploded" not in second.stderr


def test_no_arguments_shows_help():
    result = CliRunner().invoke(cli.app, [])
    assert "plugins" in result.output


@pytest.mark.parametrize(
    "args, field",
    [
        (["run", "--dtype", "float64"], "dtype"),
        (["run", "--ratio", "1.5"], "ratio"),
        (["compare", "--ratios", "0.5", "--device", "cpu", "--dtype", "int8"], "dtype"),
        (["run", "--samples", "0"], "samples"),
    ],
)
def test_evaluation_options_out_of_range_exit_2_naming_the_field(args, field, tmp_path):
    """Checked before any model loads: one line naming the field, no traceback, no result file."""
    result = CliRunner().invoke(cli.app, [*args, "--output", str(tmp_path / "out")], env={"COLUMNS": "200"})
    assert result.exit_code == 2, result.output
    assert f"error: {field}" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()
