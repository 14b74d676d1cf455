"""What a shared-prefill grid costs against one of its cells (issue 15's target: the 15-cell grid at most 3x one cell).

Runs the ``kvpolicy compare`` command as a user does (a new process each time, model loading included, the
full-cache references cached), in the order ``one cell, grid, one cell, ...`` so that a change of load on a shared
machine hits both sides:

* one cell: ``compare --policies snapkv --ratios 0.5`` (``--cell``);
* the grid: ``compare --policies local,h2o,snapkv,tova,elastic --ratios 0.5,0.75,0.9``;

both on ``needle`` at ``--tokens`` context tokens, ``--samples`` samples, ``--threads 1``. ``--warm`` first runs the
one cell once, unmeasured, to fill the reference cache. Prints per run the wall seconds, the CPU seconds (user + sys
of the process, from ``wait4``) and the load average before and after, then the grid/one-cell ratios, and where the
grid's time went cell by cell: the ratio-0 check (run once per policy: its later cells reuse the verdict), the
replayed prefill, the decode (teacher forcing and generation) and the rest (setup, aggregation; for the first cell,
the model load and the one recording of the prefill that every cell replays).

On a machine shared with other jobs, wall seconds include the time spent waiting for a core; CPU seconds do not, so
they are the steadier figure there.

Usage: ``python benchmarks/grid_cost.py --warm`` (about 10 minutes on a 2-core CPU at 2,048 tokens).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

GRID_POLICIES = "local,h2o,snapkv,tova,elastic"
GRID_RATIOS = "0.5,0.75,0.9"


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3]) if Path("/proc/loadavg").exists() else "n/a"


def run(cmd: list[str], log: Path) -> dict[str, Any]:
    """Run ``cmd`` to the end; its wall and CPU (user + sys) seconds and the load average around it."""
    before = load()
    t0 = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"failed ({log}): {' '.join(cmd)}")
    return {"wall": wall, "cpu": usage.ru_utime + usage.ru_stime, "load": f"{before} -> {load()}"}


def compare(args: argparse.Namespace, policies: str, ratios: str, out: Path) -> list[str]:
    shutil.rmtree(out, ignore_errors=True)  # a finished cell would be resumed, not computed
    return [args.kvpolicy, "compare", "--policies", policies, "--ratios", ratios, "--task", "needle",
            "--task-option", f"context_tokens={args.tokens}", "--samples", str(args.samples), "--threads", "1",
            "--quiet", "--output", str(out)]


def breakdown(cells_dir: Path) -> list[tuple[str, float, float, float, float]]:
    """Per cell, in the order the grid computes them: (name, wall, ratio-0 check, replayed prefill, decode) seconds."""
    rows = []
    for policy in GRID_POLICIES.split(","):
        for ratio in GRID_RATIOS.split(","):
            doc = json.loads((cells_dir / f"needle__{policy}__{float(ratio):g}.json").read_text())
            pm = doc["policy_metrics"]
            check = float(doc["honesty"].get("seconds", 0.0))
            rows.append((f"{policy}@{ratio}", doc["wall_s"], check, pm["prefill_s"], pm["decode_s"]))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cell", default="snapkv@0.5", help="the one cell, policy@ratio (one of the grid's)")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=1, help="grid runs; each between two one-cell runs")
    ap.add_argument("--warm", action="store_true", help="run the one cell once first (fills the reference cache)")
    ap.add_argument("--out", default="grid_cost_out")
    ap.add_argument("--kvpolicy", default=str(Path(sys.executable).with_name("kvpolicy")))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    policy, ratio = args.cell.split("@")
    one = lambda i: compare(args, policy, ratio, out / f"one{i}")  # noqa: E731
    if args.warm:
        run(one("_warm"), out / "warm.log")
    runs: dict[str, list[dict[str, Any]]] = {"one": [], "grid": []}
    for i in range(args.rounds):
        runs["one"].append(run(one(i), out / f"one{i}.log"))
        runs["grid"].append(run(compare(args, GRID_POLICIES, GRID_RATIOS, out / f"grid{i}"), out / f"grid{i}.log"))
    runs["one"].append(run(one(args.rounds), out / f"one{args.rounds}.log"))

    print(f"needle, {args.tokens} tokens, {args.samples} samples, --threads 1; one cell = {args.cell}")
    for name, items in runs.items():
        for r in items:
            print(f"  {name:4s}  wall {r['wall']:7.1f} s  cpu {r['cpu']:7.1f} s  load {r['load']}")
    mean = {k: {m: sum(r[m] for r in v) / len(v) for m in ("wall", "cpu")} for k, v in runs.items()}
    for m in ("wall", "cpu"):
        print(f"grid / one cell ({m}): {mean['grid'][m] / mean['one'][m]:.2f}x "
              f"({mean['grid'][m]:.1f} s / {mean['one'][m]:.1f} s, mean of the runs)")
    print("\ncells of the last grid (wall seconds inside the process): cell, wall, ratio-0 check, replay, decode, rest")
    for name, wall, check, prefill, decode in breakdown(out / f"grid{args.rounds - 1}" / "cells"):
        print(f"  {name:14s} {wall:6.1f} {check:6.1f} {prefill:6.1f} {decode:6.1f} {wall - check - prefill - decode:6.1f}")


if __name__ == "__main__":
    main()
