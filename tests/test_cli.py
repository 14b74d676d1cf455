"""The command line: ``kvpolicy plugins`` (compact, ``--verbose``, ``NAME``, ``--kind``, ``--json``) on a registry of
test parts, and through the real entry point at 80 columns."""

from __future__ import annotations

import json
import os
import subprocess
import sys
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


def test_plugins_verbose_table(registry):
    result = CliRunner().invoke(cli.app, ["plugins", "--verbose"], env={"COLUMNS": "400"})  # wide: no wrapped cells
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


def _visible_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def test_plugins_compact_fits_80_columns_problems_first(registry):
    result = CliRunner().invoke(cli.app, ["plugins"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    lines = _visible_lines(result.stdout)
    assert all(len(line) <= 80 for line in lines), max(lines, key=len)
    assert lines[0].split() == ["kind", "name", "source", "status", "summary"]
    # the failed plugin, the plugin that returned a non-part and the invalid preset come before every healthy row
    problems = [i for i, line in enumerate(lines) if "FAILED" in line or "INVALID" in line]
    healthy = [i for i, line in enumerate(lines) if " ok " in line]
    assert len(problems) == 3 and len(healthy) == 3 and max(problems) < min(healthy)
    problem_text = " ".join(line.strip() for line in lines[: min(healthy)])  # rows + their wrapped messages
    assert any(lines[i].split()[:3] == ["plugin", "cli_test_broken", "broken-pkg"] for i in problems)
    assert "raised ImportError: plugin exploded" in problem_text
    assert any(lines[i].split()[:2] == ["preset", "broken_preset"] for i in problems)
    assert "unknown encode scorer 'missing_scorer'" in problem_text
    row = next(line for line in lines if line.startswith("decode") and "distance_test" in line)
    assert row.split()[:4] == ["decode", "distance_test", "cli-test-pkg", "ok"] and "drop by distance" in row
    assert "offset: int" not in result.stdout  # parameters only in --verbose / NAME
    assert "2 parts, 2 presets, 3 problems" in result.stdout


def test_plugins_name_shows_one_part_or_preset_in_detail(registry):
    part = CliRunner().invoke(cli.app, ["plugins", "distance_test"], env={"COLUMNS": "200"})
    assert part.exit_code == 0, part.output
    assert "decode distance_test" in part.stdout and "cli-test-pkg" in part.stdout
    assert "offset: int = -25 — drop index relative to the end of the prompt" in part.stdout
    assert "evict" not in part.stdout  # only the part asked for
    preset = CliRunner().invoke(cli.app, ["plugins", "dist_preset"], env={"COLUMNS": "200"})
    assert preset.exit_code == 0 and "preset dist_preset" in preset.stdout and "ratio: 0.2" in preset.stdout
    missing = CliRunner().invoke(cli.app, ["plugins", "distance_tset"])
    assert missing.exit_code == 2 and "did you mean 'distance_test'?" in missing.stderr


def test_plugins_kind_filters_and_rejects_unknown_kinds(registry):
    result = CliRunner().invoke(cli.app, ["plugins", "--kind", "reducer"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    rows = _visible_lines(result.stdout)[1:-2]
    assert [r.split()[:2] for r in rows] == [["reducer", "evict"]]
    data = json.loads(CliRunner().invoke(cli.app, ["plugins", "--kind", "decode", "--json"]).stdout)
    assert [p["name"] for p in data["parts"]] == ["distance_test"]
    bad = CliRunner().invoke(cli.app, ["plugins", "--kind", "scorer"])
    assert bad.exit_code == 2 and "--kind: 'scorer' is not a kind of part; allowed: encode, decode" in bad.stderr


def test_real_plugins_listing_fits_80_columns():
    """The installed registry through the real entry point: one line per part and preset, none over 80 columns."""
    exe = os.path.join(os.path.dirname(sys.executable), "kvpolicy")
    env = {**os.environ, "COLUMNS": "80"}
    done = subprocess.run([exe, "plugins"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    data = json.loads(subprocess.run([exe, "plugins", "--json"], capture_output=True, text=True, timeout=300).stdout)
    lines = _visible_lines(done.stdout)
    assert all(len(line) <= 80 for line in lines), max(lines, key=len)
    expected = len(data["parts"]) + len(data["presets"]) + len(data["problems"])
    rows = [line for line in lines if not line.startswith("    ")]  # indented: a problem's wrapped message
    assert len(rows) == 1 + expected + 2  # header, one line each, two footer lines
    for part in data["parts"]:
        assert any(line.split()[:2] == [part["kind"], part["name"]] and part["source"] in line for line in lines)
