"""Other frameworks side by side: merge a result file in this schema written by another framework (kvpress, by
``benchmarks/kvpress_bench.py``) into a kvpolicy result."""

from __future__ import annotations

from pathlib import Path

from .output import read_document
from .spec import BenchResult, RunResult


def merge_external(result: BenchResult, path: str | Path) -> None:
    """Add the runs of another framework's result file (same schema, e.g. benchmarks/kvpress_bench.py); merging the
    same framework again replaces its runs."""
    doc = read_document(path)
    runs = [RunResult.model_validate(r) for r in doc.get("runs", [])]
    framework = runs[0].framework if runs else doc.get("framework", "external")
    if framework == "kvpolicy":
        raise ValueError(f"{path}: holds kvpolicy runs; --compare merges other frameworks' results")
    result.runs = [r for r in result.runs if r.framework != framework]
    result.external = [e for e in result.external if e.get("framework") != framework]
    result.external.append(
        {
            "path": str(path),
            "framework": framework,
            "environment": doc.get("environment", {}),
            "model": {k: v for k, v in doc.get("model", {}).items() if k != "config"},
            "spec": doc.get("spec", {}),
        }
    )
    result.runs.extend(runs)
