"""``kvpolicy bench``: what policies really save (bytes, prefill and decode time, peak memory) vs the full cache.

Imported only when the command runs or shows its own help (see ``LAZY_COMMANDS`` in :mod:`.common`), so
``kvpolicy --help`` does not pay for it; torch and the measuring code are imported inside the command."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from ..bench.shapes import BUILTIN_CONFIGS
from .common import fail, validation_lines


def _opt(*names: str, help: str) -> Any:
    return typer.Option(*names, help=help)


def _split(flag: str, text: str | None, cast: type) -> list[Any] | None:
    """A comma-separated flag as a list (``None`` when not given); a bad item is one line naming the flag."""
    if text is None:
        return None
    try:
        return [cast(x.strip()) for x in str(text).split(",") if x.strip()] or None
    except ValueError as exc:
        raise fail(f"--{flag}: expected comma-separated {cast.__name__}s, got {text!r}") from exc


def _check_inputs(model: str | None, config: str | None, policies: list[str] | None, report: Path | None) -> None:
    """Everything a bench run needs that can be checked before anything is measured or written."""
    from ..config import ConfigError
    from ..bench.policies import resolve_policy
    from ..eval.preflight import check_model_name

    try:
        if model:
            check_model_name(model)
        for name in policies or []:
            resolve_policy(name, 0.5)
    except ConfigError as exc:
        raise fail(str(exc)) from exc
    except ValueError as exc:
        raise fail(f"policies: {exc}") from exc
    if config and config not in BUILTIN_CONFIGS and not os.path.isfile(config):
        raise fail(f"--config: {config!r} is neither a file nor a built-in shape ({', '.join(BUILTIN_CONFIGS)})")
    if report is not None and not os.path.isfile(report):
        raise fail(f"--report: no such file {str(report)!r} (a bench.json written by kvpolicy bench)")


def _spec(fields: dict[str, Any]) -> Any:
    from pydantic import ValidationError

    from ..bench.spec import BenchSpec

    try:
        return BenchSpec(**{k: v for k, v in fields.items() if v is not None})
    except ValidationError as exc:
        validation_lines(exc, BenchSpec)
        raise typer.Exit(2) from exc


def _print(result: Any, as_json: bool) -> None:
    from ..bench.output import result_json
    from ..bench.tables import render

    if as_json:
        sys.stdout.write(json.dumps(result_json(result), indent=1) + "\n")
    else:
        render(result)


def bench(
    model: Annotated[str | None, _opt("--model", help="model alias, local path or hub id (real weights)")] = None,
    config: Annotated[
        str | None, _opt("--config", help=f"config JSON path or built-in shape: {', '.join(BUILTIN_CONFIGS)}")
    ] = None,
    policies: Annotated[str | None, _opt("--policies", help="comma-separated preset names / policy files")] = None,
    ratios: Annotated[str | None, _opt("--ratios", help="comma-separated fractions removed (default 0.75)")] = None,
    contexts: Annotated[str | None, _opt("--contexts", help="comma-separated prompt lengths")] = None,
    steps: Annotated[int | None, _opt("--steps", help="decode steps timed after each prefill")] = None,
    quick: Annotated[bool, _opt("--quick", help="tiny config and contexts, < 1 minute")] = False,
    as_json: Annotated[bool, _opt("--json", help="print the JSON result to stdout instead of the tables")] = False,
    output: Annotated[Path | None, _opt("--output", help="directory for bench.json and the plots")] = None,
    device: Annotated[str, _opt("--device", help="cpu or cuda")] = "cpu",
    dtype: Annotated[
        str, _opt("--dtype", help="auto (bf16 where native, else float32), float32, bfloat16 or float16")
    ] = "auto",
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
) -> None:
    """Measure what policies really save: cache bytes, prefill and decode time, peak memory vs the full cache."""
    names = _split("policies", policies, str)
    fields = {"policies": names, "contexts": _split("contexts", contexts, int), "ratios": _split("ratios", ratios, float)}
    _check_inputs(model, config, names, report)
    from ..bench import jobs

    if report is not None:
        _print(jobs.rerender(report, list(compare or []), output, markdown=markdown), as_json)
        return
    spec = _spec({
        **fields, "model": model, "config": config, "steps": steps, "quick": quick, "device": device, "dtype": dtype,
        "long_steps": long_steps, "compare": [str(p) for p in compare or []], "repeats": repeats, "threads": threads,
        "time_budget_s": time_budget,
    })
    from rich.console import Console

    from ..config import ConfigError

    err = Console(stderr=True)
    try:
        result = jobs.measure(spec, output, markdown=markdown, log=lambda m: err.print(f"[dim]{m}[/]") if m else None)
    except ConfigError as exc:  # an input found wrong only once the model is there (e.g. no head scores for it)
        raise fail(str(exc)) from exc
    _print(result, as_json)
