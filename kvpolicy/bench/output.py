"""Result files: ``bench.json`` (written atomically, read back against the schema), the plots beside it and the
tables as Markdown."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..io import atomic_write_text, write_json_atomic
from .spec import SCHEMA, BenchResult


def read_document(path: str | Path) -> dict[str, Any]:
    """A JSON file in this schema, as a dict (``ValueError`` naming the file when the schema differs)."""
    doc = json.loads(Path(path).read_text())
    if doc.get("schema") != SCHEMA:
        raise ValueError(f"{path}: schema {doc.get('schema')!r}, expected {SCHEMA!r}")
    return doc


def load_result(path: str | Path) -> BenchResult:
    """Read a bench.json back (validated against the schema)."""
    return BenchResult.model_validate(read_document(path))


def result_json(result: BenchResult) -> dict[str, Any]:
    return result.model_dump(mode="json", by_alias=True)


def write_outputs(result: BenchResult, outdir: str | Path, plots: bool = True) -> dict[str, str]:
    """``bench.json`` and (``plots``) the PNG plots in ``outdir``; the file paths are recorded in ``result.files``."""
    from .plots import plot

    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    files = plot(result, outdir) if plots else {}
    files["json"] = str(outdir / "bench.json")
    result.files = files
    write_json_atomic(outdir / "bench.json", result_json(result))
    return files


def write_markdown(result: BenchResult, outdir: str | Path) -> Path:
    """The report's tables as Markdown in ``outdir/tables.md`` (atomically: temporary file, then rename)."""
    import io

    from rich.console import Console

    from .tables import render

    buf = io.StringIO()
    render(result, Console(file=buf, width=400, color_system=None, soft_wrap=True), markdown=True)
    path = atomic_write_text(Path(outdir) / "tables.md", buf.getvalue())
    result.files["markdown"] = str(path)
    return path
