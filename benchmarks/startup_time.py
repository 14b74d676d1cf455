"""How long the command line takes before it does anything: ``kvpolicy --help`` and ``kvpolicy <cmd> --help``.

Each command runs N times in a fresh process (after one warm-up run that fills the OS file cache); the wall time of
the whole process is printed as median / min / max (quote the median). Then ``python -X importtime`` lists the
modules that cost the most to import for ``--help`` and for the slowest command, so a regression names its cause.

    python benchmarks/startup_time.py                 # every command, 5 runs each
    python benchmarks/startup_time.py -n 10 run bench # chosen commands
    python benchmarks/startup_time.py --json          # machine-readable

Only the standard library and the ``kvpolicy`` entry point of the running interpreter's environment are used.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path


def kvpolicy_command() -> list[str]:
    """The installed ``kvpolicy`` script beside this interpreter (what users run), else ``python -m kvpolicy``."""
    script = Path(sys.executable).with_name("kvpolicy")
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    found = shutil.which("kvpolicy")
    return [found] if found else [sys.executable, "-m", "kvpolicy"]


def all_commands() -> list[str]:
    """The command names as ``kvpolicy --help`` lists them (importing the CLI costs no torch)."""
    import click
    import typer

    from kvpolicy.cli import app

    group = typer.main.get_command(app)
    with click.Context(group) as ctx:
        return list(group.list_commands(ctx))  # type: ignore[attr-defined]


def time_runs(argv: list[str], runs: int, warmup: int = 1) -> dict[str, float]:
    """Wall seconds of ``argv`` (a whole process, output discarded): median, min, max over ``runs``."""
    walls = []
    for i in range(warmup + runs):
        t0 = time.perf_counter()
        proc = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(argv)} exited {proc.returncode}")
        if i >= warmup:
            walls.append(wall)
    return {"median": statistics.median(walls), "min": min(walls), "max": max(walls), "runs": runs}


def import_offenders(args: list[str], top: int) -> list[dict[str, float | str]]:
    """The ``top`` modules by cumulative import time (``-X importtime``) for ``python -m kvpolicy <args>``, keeping
    only the outermost entry of each package so that one slow dependency is listed once."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "kvpolicy", *args],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, check=False,
    )
    rows = []
    for line in proc.stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line or "self [us]" in line:
            continue
        self_us, cumulative_us, name = line.removeprefix("import time:").split("|")
        name = name.removeprefix(" ")  # then two spaces per nesting level
        depth = (len(name) - len(name.lstrip())) // 2
        rows.append({"module": name.strip(), "self_s": int(self_us) / 1e6, "cumulative_s": int(cumulative_us) / 1e6,
                     "depth": depth})
    outer = [r for r in rows if r["depth"] == 0]
    outer.sort(key=lambda r: r["cumulative_s"], reverse=True)
    return [{k: r[k] for k in ("module", "cumulative_s", "self_s")} for r in outer[:top]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("commands", nargs="*", help="commands to time (default: all); '' means plain --help")
    parser.add_argument("-n", "--runs", type=int, default=5, help="timed runs per command (default 5)")
    parser.add_argument("--top", type=int, default=8, help="import-time offenders listed (default 8)")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    opts = parser.parse_args()

    base = kvpolicy_command()
    commands = opts.commands or ["", *all_commands()]
    timings = {}
    for cmd in commands:
        argv = [*base, *([cmd] if cmd else []), "--help"]
        timings[f"kvpolicy {cmd} --help".replace("  ", " ")] = time_runs(argv, opts.runs)
    slowest = max(commands, key=lambda c: timings[f"kvpolicy {c} --help".replace("  ", " ")]["median"])
    offenders = {"--help": import_offenders(["--help"], opts.top)}
    if slowest:
        offenders[f"{slowest} --help"] = import_offenders([slowest, "--help"], opts.top)
    doc = {"python": sys.version.split()[0], "cpus": os.cpu_count(), "timings": timings, "import_offenders": offenders}
    if opts.json:
        print(json.dumps(doc, indent=1))
        return
    width = max(len(k) for k in timings)
    print(f"wall seconds per process, {opts.runs} runs after 1 warm-up ({os.cpu_count()} CPUs)")
    print(f"{'command':{width}}  median     min     max")
    for name, t in timings.items():
        print(f"{name:{width}}  {t['median']:6.3f}  {t['min']:6.3f}  {t['max']:6.3f}")
    for what, rows in offenders.items():
        print(f"\nslowest imports (cumulative, outermost) for python -X importtime -m kvpolicy {what}:")
        for r in rows:
            print(f"  {r['cumulative_s']:7.3f} s  (self {r['self_s']:.3f} s)  {r['module']}")


if __name__ == "__main__":
    main()
