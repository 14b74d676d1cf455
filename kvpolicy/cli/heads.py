"""``kvpolicy calibrate-heads``: measure how much each kv head of a model needs its whole context, and cache it.

The scores are what head-wise policies read (the ``duo_attention`` reducer finds them by model when its
``head_scores`` is null); see :mod:`kvpolicy.heads.calibrate` for what is measured and ``docs/baselines.md``.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import typer
from rich.text import Text

from .common import app, fail, stderr_console, stdout_console, validation_lines


def _settings(**values):
    from pydantic import ValidationError

    from ..heads.settings import HeadCalibration

    try:
        return HeadCalibration(**{k: v for k, v in values.items() if v is not None})
    except ValidationError as exc:
        validation_lines(exc, HeadCalibration)
        raise typer.Exit(2) from exc


def _summary(scores, path: Path, seconds: float, cached: bool) -> list[str]:
    """A few lines: where the table is, how long it took, and each scored layer's heads (rank 1 = most needed)."""
    flat = [(v, i, h) for i, row in enumerate(scores.tolist()) for h, v in enumerate(row) if not math.isnan(v)]
    rank = {(i, h): r for r, (_, i, h) in enumerate(sorted(flat, key=lambda t: (-t[0], t[1], t[2])), start=1)}
    how = "read from the cache" if cached else f"measured in {seconds:.1f} s"
    lines = [f"head scores ({len(flat)} kv heads, {how}): {path}",
             "mean KL when the head alone is streamed (nats; [rank], 1 = needs the whole context most):"]
    for i, row in enumerate(scores.tolist()):
        if all(math.isnan(v) for v in row):
            continue
        lines.append(f"  layer {i:>3}: " + "  ".join(f"{v:.3e} [{rank[(i, h)]}]" for h, v in enumerate(row)))
    return lines


@app.command("calibrate-heads")
def calibrate_heads_command(
    model: str = typer.Option("smollm2-135m", help="model alias, local path or hub id"),
    sinks: int = typer.Option(None, help="first context tokens a streamed head keeps (default 64)"),
    recent: int = typer.Option(None, help="last context tokens a streamed head keeps (default 256)"),
    context_tokens: int = typer.Option(None, help="calibration prompt length (default max(1024, 4 (sinks+recent)))"),
    tasks: str = typer.Option(None, help="RULER tasks, comma list (default: the eight niah_* tasks)"),
    samples: int = typer.Option(None, help="calibration samples (default 8)"),
    seed: int = typer.Option(None, help="seed of the RULER generators (default 1000, apart from evaluation seeds)"),
    batch: int = typer.Option(None, help="kv heads measured per forward (default 4; memory vs speed)"),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:1, ..."),
    dtype: str = typer.Option("auto", "--dtype", help="auto, bfloat16, float16 or float32"),
    threads: int = typer.Option(None, "--threads", min=1, help="torch threads"),
    force: bool = typer.Option(False, "--force", help="measure again even when the scores are cached"),
    output: Path = typer.Option(None, "--output", help="also copy the score table (TSV) here"),
    as_json: bool = typer.Option(False, "--json", help="print machine-readable JSON"),
) -> None:
    """Score every kv head by how much streaming it alone (sinks + recent window) changes the model's answers on
    RULER needle prompts; cache the table per model and settings (head-wise policies read it)."""
    settings = _settings(sinks=sinks, recent=recent, context_tokens=context_tokens, tasks=tasks, samples=samples,
                         seed=seed, batch=batch)
    import torch

    from ..hardware import resolve_dtype
    from ..heads.calibrate import calibrate_heads
    from ..heads.store import model_identity, scores_path
    from ..models import load_model

    if threads:
        torch.set_num_threads(threads)
    try:
        mdl, tok = load_model(model, dtype=resolve_dtype(dtype, device), device=device)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        raise fail(f"--model: {exc}") from exc
    err = stderr_console()

    def progress(done: int, total: int) -> None:
        if not as_json:
            err.print(Text(f"calibrate-heads: sample {done}/{total}", style="dim"))

    cached = not force and scores_path(model_identity(mdl), settings).exists()
    t0 = time.perf_counter()
    result = calibrate_heads(mdl, tok, settings, use_cache=not force, progress=progress)
    seconds = time.perf_counter() - t0
    path = Path(result.source)
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, output)
    if as_json:
        doc = {"path": str(path), "scores": [[None if math.isnan(v) else v for v in row] for row in
                                             result.scores.tolist()], "meta": result.meta}
        typer.echo(json.dumps(doc, indent=1))
        return
    out = stdout_console()
    for line in _summary(result.scores, path, seconds, cached):
        out.print(line, soft_wrap=True, highlight=False, markup=False)
