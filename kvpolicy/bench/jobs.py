"""A whole ``kvpolicy bench`` job as the library does it: measure a spec and write its files (checkpointing
``bench.json`` as configurations finish, so a killed run keeps what it measured), or re-render an earlier
``bench.json`` with other frameworks' results merged in. The command line only parses, calls these and prints."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from ..io import write_json_atomic
from .external import merge_external
from .output import load_result, result_json, write_markdown, write_outputs
from .run import run_bench
from .spec import BenchResult, BenchSpec
from .targets import evaluate_targets


def default_output() -> Path:
    return Path("runs") / f"bench-{datetime.now():%Y%m%d-%H%M%S}"


def measure(
    spec: BenchSpec, output: Path | None = None, *, markdown: bool = False, log: Callable[[str], Any] | None = None
) -> BenchResult:
    """Measure ``spec`` into ``output`` (default ``runs/bench-<time>``): ``bench.json``, plots, ``tables.md``."""
    outdir = Path(output) if output is not None else default_output()
    spec.output = str(outdir)

    def checkpoint(partial: BenchResult) -> None:
        write_json_atomic(outdir / "bench.json", result_json(partial))

    result = run_bench(spec, log=log, checkpoint=checkpoint)
    write_outputs(result, outdir, plots=spec.plots)
    if markdown:
        write_markdown(result, outdir)
    return result


def rerender(report: Path, compare: list[Path], output: Path | None = None, *, markdown: bool = False) -> BenchResult:
    """Measure nothing: read ``report``, merge the ``compare`` files into it, re-evaluate the targets and rewrite the
    files (beside ``report`` unless ``output`` is given)."""
    result = load_result(report)
    for path in compare:
        merge_external(result, path)
    result.targets = evaluate_targets(result)
    outdir = Path(output) if output is not None else Path(report).parent
    write_outputs(result, outdir, plots=True)
    if markdown:
        write_markdown(result, outdir)
    return result
