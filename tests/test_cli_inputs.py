"""What a new user types, through the real ``kvpolicy`` entry point in subprocesses: a bad input is one line on
stderr naming the field, exit 2, no traceback, nothing written, and no model loaded first; a policy file keeps its
own ratio unless ``--ratio`` is given, and its results carry its name (the file's stem or its ``name:``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from checkpoints import tiny_checkpoint

KVPOLICY = Path(sys.executable).with_name("kvpolicy")

FILES = {
    "typo.yaml": "preset: elastic\ndecode: {name: distanse_offset}\n",
    "over.yaml": "preset: elastic\nratio: 1.5\n",
    "word.yaml": "preset: elastic\nratio: half\n",
    "empty.yaml": "",
    "half.yaml": "preset: elastic\nratio: 0.5\n",
    "named.yaml": "name: tuned\npreset: h2o\nratio: 0.25\n",
    "sweep.yaml": "name: s\npolicy: elastic\nmodel: /nonexistent/model\nspace: {ratio: {type: float, low: 0.1, "
    "high: 0.5}}\nobjectives: [ppl]\nwandb: false\n",
}


def kvpolicy(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "KVPOLICY_CACHE": str(cwd / "cache"),
           "COLUMNS": "80"}
    return subprocess.run([str(KVPOLICY), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    for name, text in FILES.items():
        (tmp_path / name).write_text(text)
    return tmp_path


@pytest.mark.parametrize(
    "args, expected",
    [
        (["run", "--model", "/nonexistent/model"], "error: model: local model path '/nonexistent/model' does not"),
        (["run", "--task", "nosuchtask"], "error: task: unknown task 'nosuchtask'; available: continuation"),
        (["run", "--task-option", "context_tokens=-3"], "error: task_options.context_tokens:"),
        (["run", "--policy", "typo.yaml"], "error: typo.yaml: decode.name: unknown decode scorer 'distanse_offset'"),
        (["run", "--policy", "over.yaml"], "error: over.yaml: ratio: 1.5 is out of range; allowed range: [0, 1)"),
        (["run", "--policy", "word.yaml"], "error: word.yaml: ratio: expected float, got 'half'"),
        (["run", "--policy", "empty.yaml"], "error: empty.yaml: ratio: no budget: set ratio"),
        (["compare", "--policies", "elastic,nosuch"], "error: preset: unknown preset 'nosuch'"),
        (["compare", "--task", "continuation,nosuch"], "error: task: unknown task 'nosuch'"),
        (["compare", "--ratios", "0.5,x"], "error: ratios: expected comma-separated numbers"),
        (["demo", "--policy", "empty.yaml"], "error: empty.yaml: ratio: no budget"),
        (["demo", "--prompt-tokens", "0"], "error: --prompt-tokens: 0 is out of range; allowed: >= 1"),
        (["bench", "--policies", "elastic,nosuch", "--quick"], "error: policies: unknown policy 'nosuch'"),
        (["bench", "--model", "/nonexistent/model"], "error: model: local model path '/nonexistent/model'"),
        (["sweep", "sweep.yaml"], "local model path '/nonexistent/model' does not exist"),
        (["sweep", "missing.yaml"], "error: cannot read 'missing.yaml'"),
        (["ablate", "missing.yaml"], "error: cannot read 'missing.yaml'"),
        (["report", "missing_dir"], "error: study: 'missing_dir' is not a results folder"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_nothing_written(workdir, args, expected):
    before = set(workdir.iterdir())
    out = [] if args[0] in ("demo", "report") else ["--output", "out"]
    done = kvpolicy([*args, *out], workdir)
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [done.stderr.strip()] and expected in done.stderr, done.stderr
    assert "Loading" not in done.stderr + done.stdout  # failed before any weights loaded
    assert set(workdir.iterdir()) == before  # no output folder, no result file, no cache


def test_policy_file_keeps_its_ratio_and_name(workdir):
    """half.yaml says ratio 0.5: run reports 0.5 (not the old 0.8 default) under the name 'half'; --ratio wins."""
    model = str(tiny_checkpoint(workdir / "tiny"))
    small = ["--model", model, "--samples", "2", "--task-option", "context_tokens=32",
             "--task-option", "target_tokens=4", "--dtype", "float32", "--quiet"]
    own = kvpolicy(["run", "--policy", "half.yaml", *small, "--output", "own.json"], workdir)
    assert own.returncode == 0, own.stderr
    doc = json.loads((workdir / "own.json").read_text())
    assert doc["policy"]["ratio"] == 0.5 and doc["spec"]["ratio"] is None and doc["policy_name"] == "half"
    assert "half (ratio 0.5) vs full cache" in own.stdout

    flag = kvpolicy(["run", "--policy", "half.yaml", "--ratio", "0.3", *small, "--output", "flag.json"], workdir)
    assert flag.returncode == 0, flag.stderr
    assert json.loads((workdir / "flag.json").read_text())["policy"]["ratio"] == 0.3

    # compare without --ratios: each policy at its own ratio, cells and tables named by the files' names
    grid = kvpolicy(["compare", "--policies", "full,half.yaml,named.yaml", *small, "--output", "grid", "--json"],
                    workdir)
    assert grid.returncode == 0, grid.stderr
    cells = sorted(p.name for p in (workdir / "grid" / "cells").iterdir())
    assert cells == ["continuation__half__0.5.json", "continuation__tuned__0.25.json"]
    summary = json.loads(grid.stdout)["cells"]["continuation"]
    assert set(summary) == {"full", "half", "tuned"} and set(summary["tuned"]) == {"0.25"}
