"""The ``kvpolicy bench`` command: :func:`bench_cli` (typer signature) and :func:`main` (its argparse twin, for
``python -m kvpolicy.bench``).

Only typer and the standard library at module level: ``kvpolicy --help`` registers the command by importing this
module, so torch, transformers and the measuring code are imported inside the function, when it runs."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

from .shapes import BUILTIN_CONFIGS

try:  # typer is the CLI's framework; bench_cli stays callable without it
    import typer

    def _opt(*names: str, help: str) -> Any:
        return typer.Option(*names, help=help)

except ImportError:  # pragma: no cover

    def _opt(*names: str, help: str) -> Any:
        return None


def _split(text: str | None, cast: Callable[[str], Any]) -> list[Any] | None:
    if text is None:
        return None
    items = [x.strip() for x in str(text).split(",") if x.strip()]
    return [cast(x) for x in items] or None


def _print(result: Any, json_: bool) -> None:
    """The result as JSON on stdout, or as the tables."""
    from .output import result_json
    from .tables import render

    if json_:
        sys.stdout.write(json.dumps(result_json(result), indent=1) + "\n")
    else:
        render(result)


def _report(report: Path, compare: list[Path], output: Path | None, markdown: bool, json_: bool) -> int:
    """``--report``: measure nothing; re-render a bench.json (merging ``--compare`` into it) and rewrite its files."""
    from .external import merge_external
    from .output import load_result, write_markdown, write_outputs
    from .targets import evaluate_targets

    result = load_result(report)
    for path in compare:
        merge_external(result, path)
    result.targets = evaluate_targets(result)
    outdir = output if output is not None else Path(report).parent
    write_outputs(result, outdir, plots=True)
    if markdown:
        write_markdown(result, outdir)
    _print(result, json_)
    return 0


def _measure(fields: dict[str, Any], output: Path | None, markdown: bool, json_: bool) -> int:
    """Measure the spec made of ``fields``, checkpointing ``bench.json`` in the output directory as it goes."""
    from rich.console import Console

    from .output import result_json, write_json_atomic, write_markdown, write_outputs
    from .run import run_bench
    from .spec import BenchResult, BenchSpec

    spec = BenchSpec(**fields)
    outdir = Path(output if output is not None else Path("runs") / f"bench-{datetime.now():%Y%m%d-%H%M%S}")
    spec.output = str(outdir)
    err = Console(stderr=True)

    def checkpoint(partial: BenchResult) -> None:
        outdir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(outdir / "bench.json", result_json(partial))

    result = run_bench(spec, log=lambda m: err.print(f"[dim]{m}[/]") if m else None, checkpoint=checkpoint)
    write_outputs(result, outdir, plots=spec.plots)
    if markdown:
        write_markdown(result, outdir)
    _print(result, json_)
    return 0


def bench_cli(
    model: Annotated[str | None, _opt("--model", help="model alias, local path or hub id (real weights)")] = None,
    config: Annotated[
        str | None, _opt("--config", help=f"config JSON path or built-in shape: {', '.join(BUILTIN_CONFIGS)}")
    ] = None,
    policies: Annotated[str | None, _opt("--policies", help="comma-separated preset names / policy files")] = None,
    ratios: Annotated[str | None, _opt("--ratios", help="comma-separated fractions removed (default 0.75)")] = None,
    contexts: Annotated[str | None, _opt("--contexts", help="comma-separated prompt lengths")] = None,
    steps: Annotated[int | None, _opt("--steps", help="decode steps timed after each prefill")] = None,
    quick: Annotated[bool, _opt("--quick", help="tiny config and contexts, < 1 minute")] = False,
    json_: Annotated[bool, _opt("--json", help="print the JSON result to stdout instead of the tables")] = False,
    output: Annotated[Path | None, _opt("--output", help="directory for bench.json and the plots")] = None,
    device: Annotated[str, _opt("--device", help="cpu or cuda")] = "cpu",
    dtype: Annotated[str, _opt("--dtype", help="auto (bf16 where native, else float32), float32, bfloat16 or float16")] = "auto",
    repeats: Annotated[int | None, _opt("--repeats", help="prefill repeats (median)")] = None,
    long_steps: Annotated[
        int | None, _opt("--long-steps", help="tokens of the long fixed-budget run (0: none)")
    ] = None,
    compare: Annotated[
        list[Path] | None, _opt("--compare", help="merge another framework's JSON (benchmarks/kvpress_bench.py)")
    ] = None,
    report: Annotated[
        Path | None, _opt("--report", help="measure nothing: re-render (and merge --compare into) this bench.json")
    ] = None,
    threads: Annotated[
        int | None, _opt("--threads", help="torch threads (1 is steadier on a machine shared with other jobs)")
    ] = None,
    time_budget: Annotated[
        float | None, _opt("--time-budget", help="seconds to fit the run into (default 540 with default contexts)")
    ] = None,
    markdown: Annotated[
        bool, _opt("--markdown", help="also write the tables as Markdown (tables.md beside bench.json)")
    ] = False,
) -> int:
    """Measure what policies really save: cache bytes, prefill and decode time, peak memory vs the full cache."""
    if report is not None:
        return _report(report, list(compare or []), output, markdown, json_)
    fields: dict[str, Any] = {
        "model": model,
        "config": config,
        "policies": _split(policies, str),
        "contexts": _split(contexts, int),
        "steps": steps,
        "quick": quick,
        "device": device,
        "dtype": dtype,
        "long_steps": long_steps,
        "compare": [str(p) for p in compare or []],
    }
    optional = {"ratios": _split(ratios, float), "repeats": repeats, "threads": threads, "time_budget_s": time_budget}
    fields.update({k: v for k, v in optional.items() if v is not None})
    return _measure(fields, output, markdown, json_)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m kvpolicy.bench [--quick] ...`` (argparse twin of :func:`bench_cli`)."""
    import argparse

    p = argparse.ArgumentParser(prog="kvpolicy bench", description=bench_cli.__doc__)
    for flag in ("--model", "--config", "--policies", "--ratios", "--contexts"):
        p.add_argument(flag)
    p.add_argument("--steps", type=int)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", dest="json_", action="store_true")
    p.add_argument("--output", type=Path)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--repeats", type=int)
    p.add_argument("--long-steps", type=int)
    p.add_argument("--compare", type=Path, action="append")
    p.add_argument("--report", type=Path)
    p.add_argument("--threads", type=int)
    p.add_argument("--time-budget", type=float)
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args(argv)
    return bench_cli(**vars(args))
