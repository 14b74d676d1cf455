"""A sweep's ``best_policy.yaml`` reproduces its trial: ``kvpolicy run --policy <out>/best_policy.yaml`` measures the
same number the sweep recorded for the chosen trial (same model, task options, samples, seed, batch size, dtype).

Both commands run through the real ``kvpolicy`` entry point in subprocesses, on a tiny random Llama checkpoint
saved locally (nothing downloaded). Every setting of the sweep differs from ``run``'s defaults (float32 instead of
bfloat16, batch size 2 instead of 16, 4 samples instead of 50, seed 1, a 48-token context), so a setting the file
fails to carry changes the number.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from checkpoints import tiny_checkpoint

KVPOLICY = Path(sys.executable).with_name("kvpolicy")


def kvpolicy(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "KVPOLICY_CACHE": str(cwd / "cache")}
    return subprocess.run([str(KVPOLICY), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_best_policy_yaml_reproduces_its_trial(tmp_path):
    model = tiny_checkpoint(tmp_path / "tiny")
    sweep = {
        "name": "repro",
        "model": str(model),
        "task": {"name": "continuation", "context_tokens": 48, "target_tokens": 6, "dtype": "float32", "seed": 1,
                 "reference_dir": str(tmp_path / "refs")},
        "samples": 4,
        "batch_size": 2,
        "policy": {"preset": "elastic"},
        "space": {"ratio": {"type": "float", "low": 0.3, "high": 0.8},
                  "decode.offset": {"type": "int", "low": -8, "high": -1}},
        "objectives": [{"metric": "ppl", "direction": "minimize"}],
        "n_trials": 3,
        "wandb": False,
        "output": str(tmp_path / "out"),
    }
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(sweep, sort_keys=False))
    done = kvpolicy(["sweep", "sweep.yaml", "--quiet"], tmp_path)
    assert done.returncode == 0, done.stderr

    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    rows = {r["number"]: r for r in json.loads((tmp_path / "out" / "trials.json").read_text())}
    chosen = rows[summary["chosen_trial"]]
    best = yaml.safe_load((tmp_path / "out" / "best_policy.yaml").read_text())
    assert best["ratio"] == pytest.approx(chosen["params.ratio"])
    assert best["evaluation"]["batch_size"] == 2 and best["evaluation"]["dtype"] == "float32"

    ran = kvpolicy(["run", "--policy", "out/best_policy.yaml", "--output", "run.json", "--quiet"], tmp_path)
    assert ran.returncode == 0, ran.stderr
    result = json.loads((tmp_path / "run.json").read_text())
    assert result["policy_metrics"]["ppl"] == pytest.approx(chosen["ppl"], rel=1e-6)
    assert result["spec"]["samples"] == 4 and result["spec"]["seed"] == 1
    assert result["model"]["dtype"] == "torch.float32" and result["spec"]["batch_size"] == 2
    assert result["policy_name"] == f"repro-trial-{chosen['number']}"  # its name: field, not 'elastic'

    # a flag given on the command line still wins over the file: a different measurement, recorded as such
    other = kvpolicy(["run", "--policy", "out/best_policy.yaml", "--samples", "2", "--output", "two.json",
                      "--quiet"], tmp_path)
    assert other.returncode == 0, other.stderr
    two = json.loads((tmp_path / "two.json").read_text())
    assert two["spec"]["samples"] == 2 and two["spec"]["batch_size"] == 2
