"""Startup: the command line answers ``--help`` without importing torch, transformers or the plugins.

Checked by module, not by time (times depend on the machine; ``benchmarks/startup_time.py`` measures them): a fresh
interpreter imports ``kvpolicy.cli`` or asks each command for its help, then reports what ``sys.modules`` holds."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from kvpolicy import cli

HEAVY = ("torch", "transformers", "numpy", "optuna", "wandb", "kvpolicy.registry", "kvpolicy.bench")

PROBE = """
import json, sys
from typer.testing import CliRunner
args = json.loads(sys.argv[1])
if args is None:
    import kvpolicy.cli
    code = 0
else:
    from kvpolicy.cli import app
    result = CliRunner().invoke(app, args)
    code = result.exit_code
heavy = json.loads(sys.argv[2])
print(json.dumps({"code": code, "loaded": sorted(m for m in sys.modules if m.split(".")[0] in heavy or m in heavy)}))
"""


def _probe(args: list[str] | None) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(args), json.dumps(HEAVY)],
        capture_output=True, text=True, timeout=300, check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_importing_the_cli_imports_no_torch():
    assert _probe(None) == {"code": 0, "loaded": []}


@pytest.mark.parametrize("command", ["", "plugins", "demo", "run", "compare", "sweep", "ablate", "report"])
def test_help_imports_no_torch_and_loads_no_plugins(command):
    args = [command, "--help"] if command else ["--help"]
    assert _probe(args) == {"code": 0, "loaded": []}


def test_bench_help_imports_its_command_module_only():
    """``bench --help`` imports ``kvpolicy.cli.bench`` (its options are the command's signature, which names the
    built-in shapes of ``kvpolicy.bench.shapes``) but nothing heavy: torch is imported inside the command."""
    out = _probe(["bench", "--help"])
    assert out["code"] == 0
    assert set(out["loaded"]) <= {"kvpolicy.bench", "kvpolicy.bench.shapes"}, out["loaded"]


def test_public_api_loads_on_first_use():
    """``kvpolicy.attach`` & co. are still there (PEP 562 ``__getattr__``), the same objects as in their modules."""
    code = (
        "import sys, kvpolicy\n"
        "assert 'torch' not in sys.modules\n"
        "from kvpolicy import attach, make_cache, PolicyCache, CachePolicy, select_top\n"
        "import kvpolicy.core.engine as e, kvpolicy.core.cache as c\n"
        "assert attach is e.attach and make_cache is e.make_cache and PolicyCache is c.PolicyCache\n"
        "assert set(kvpolicy.__all__) <= set(dir(kvpolicy))\n"
        "assert all(getattr(kvpolicy, n) is not None for n in kvpolicy.__all__)\n"
        "try:\n    kvpolicy.no_such_name\nexcept AttributeError:\n    print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_lazy_bench_command_lists_its_own_summary_and_runs_the_real_one():
    """The listing's summary of ``bench`` is the first line of ``bench_cli``'s docstring; ``bench --help`` shows the
    real command's options (imported on demand)."""
    from kvpolicy.cli.bench import bench as bench_cli

    module, attr, summary = cli.LAZY_COMMANDS["bench"]
    assert summary == bench_cli.__doc__.strip().splitlines()[0]
    result = CliRunner().invoke(cli.app, ["bench", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "--policies" in result.output and "--dtype" in result.output
    listing = CliRunner().invoke(cli.app, ["--help"], env={"COLUMNS": "200"})
    assert "bench" in listing.output and summary in listing.output
