"""A third-party part that returns a malformed result, run through the real ``kvpolicy run``: one line on stderr that
names the part and its package, exit 1, no traceback. The plugin is installed the way pip installs one - a
``.dist-info`` folder with an entry point - on a ``PYTHONPATH`` folder, so discovery is the real entry-point path."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from checkpoints import tiny_checkpoint

KVPOLICY = Path(sys.executable).with_name("kvpolicy")

PLUGIN = '''
from pydantic import BaseModel
from kvpolicy.hookspecs import PartSpec, hookimpl


class NoParams(BaseModel):
    pass


class FlatScores:
    """Forgets the head axis: [B, P] instead of [B, H or 1, P]."""

    needs = frozenset()

    def __init__(self, params):
        pass

    def score(self, view):
        return view.positions[:, 0].float()


@hookimpl
def kvpolicy_parts():
    return [PartSpec("vnorm_recent", "encode", NoParams, FlatScores, "scores with the head axis forgotten")]
'''


def _install_plugin(site: Path) -> None:
    (site / "shaky_plugin.py").write_text(PLUGIN)
    info = site / "kvpolicy_myplugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: kvpolicy-myplugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[kvpolicy.plugins]\nmyplugin = shaky_plugin\n")


def test_a_malformed_part_output_is_one_line_naming_the_part(tmp_path: Path):
    site = tmp_path / "site"
    site.mkdir()
    _install_plugin(site)
    model = tiny_checkpoint(tmp_path / "tiny")
    (tmp_path / "bad.yaml").write_text("encode: vnorm_recent\nreducer: evict\nratio: 0.5\n")
    env = {**os.environ, "PYTHONPATH": str(site), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1",
           "KVPOLICY_CACHE": str(tmp_path / "cache"), "COLUMNS": "80"}
    out = subprocess.run(
        [str(KVPOLICY), "run", "--policy", "bad.yaml", "--model", str(model), "--samples", "2", "--quiet",
         "--dtype", "float32", "--task-option", "context_tokens=128"],  # word-level tokens: a window holds ~230
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 1, out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in out.stderr, out.stderr
    assert errors[0].startswith(
        "error: encode scorer 'vnorm_recent' from package kvpolicy-myplugin returned shape (2, "
    ), errors[0]
    assert "expected scores [B, H or 1, P]" in errors[0]
    assert not (tmp_path / "results.json").exists()
