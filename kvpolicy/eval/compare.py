"""A quality-vs-budget grid: every (task, policy, ratio) cell evaluated once, one result file per cell, and the
summary the tables and plots are drawn from.

``compare`` writes each cell's JSON as soon as the cell is done (atomically) and skips a cell whose file already holds
a complete result of the same computation (:func:`spec_signature`), so an interrupted grid resumes where it stopped
and several processes can share one grid. Every cell is checked (:func:`~.preflight.plan_cells`) before anything is
written or any model loads.

One process evaluates every cell: the model loads once (memoised per process), the full-cache references are
computed by the first cell of a task and read by the others, and each batch's prefill is recorded once and replayed
by every cell that can share it (one :class:`~.prefill_store.PrefillStore` for the whole grid; ``share_prefill:
false`` runs every cell's prefill directly). Whether a cell's prefill was shared does not make it another computation
for resuming: the replay gives the direct path's numbers (bit for bit where both use the same kernel, within float
rounding elsewhere), so a cell computed either way is done.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..io import write_json_atomic
from . import runner
from .prefill_store import store_for
from .preflight import plan_cells
from .spec import EvalResult, EvalSpec, write_result

#: spec fields that decide how a cell is computed, not what it computes: a finished cell is done whatever they were
RUN_ONLY_FIELDS = ("quiet", "threads", "share_prefill", "prefill_cache_gb", "prefill_spill", "prefill_spill_dir")


@dataclass
class CellDone:
    """A cell just computed (what :func:`compare` tells its ``on_cell`` callback)."""

    task: str
    label: str
    ratio: float
    result: EvalResult
    seconds: float


def cell_name(task: str, policy: str, ratio: float) -> str:
    """The cell's file stem; a label that is not a plain word (a policy's free-form ``name:``) is made one."""
    return f"{task}__{re.sub(r'[^A-Za-z0-9_.+-]', '_', policy)}__{ratio:g}"


def cell_ratio(doc: dict[str, Any]) -> float | None:
    """The ratio a cell ran at: the one the grid set, else the policy's own (``compare`` without ``--ratios``)."""
    ratio = doc["spec"]["ratio"]
    return ratio if ratio is not None else doc["policy"].get("ratio")


def spec_signature(spec: EvalSpec, dtype: str | None = None) -> dict[str, Any]:
    """What makes two cells the same computation: the spec without display, threading and prefill-sharing settings
    (:data:`RUN_ONLY_FIELDS`), with ``dtype`` the resolved one (``dtype``, else ``spec.dtype`` resolved here), so an
    ``auto`` cell computed in bfloat16 is not taken as done on a machine where ``auto`` means float32 (an explicit
    ``float32`` cell matches ``auto`` there)."""
    from ..hardware import dtype_name, resolve_dtype

    d = spec.model_dump(mode="json")
    for k in RUN_ONLY_FIELDS:
        d.pop(k, None)
    d["dtype"] = dtype or dtype_name(resolve_dtype(spec.dtype, spec.device))
    return d


def cell_dtype(doc: dict[str, Any]) -> str | None:
    """The dtype a cell file was computed in: its ``dtype``, or (older files) its model's ``torch.<name>``."""
    recorded = doc.get("dtype") or (doc.get("model") or {}).get("dtype")
    return str(recorded).removeprefix("torch.") if recorded else None


def query_mode(spec: EvalSpec) -> bool | None:
    """The ``query_aware`` option ``spec``'s task resolves to (its default when not given); ``None`` when the task has
    no such option (or the options do not validate: the cell then runs and reports the error)."""
    from .tasks import get_task

    try:
        options = get_task(spec.task).options(dict(spec.task_options))
    except Exception:
        return None
    value = getattr(options, "query_aware", None)
    return bool(value) if value is not None else None


def one_prompt_is_aware(mode: bool | None) -> bool:
    """A recorded or resolved ``query_aware``, with ``None`` (a cell from before a task had the option, or a task
    without it: one prompt) read as ``True``: one prompt compressed together is the query-aware computation. So a
    ``needle`` cell from before the option resumes under its default (``true``), and a ``ruler`` one is recomputed
    under its default (``false``)."""
    return True if mode is None else mode


def is_done(path: Path, spec: EvalSpec) -> bool:
    """Whether ``path`` holds a complete result of the same computation as ``spec`` (an unreadable file: no)."""
    if not path.exists():
        return False
    try:
        old = json.loads(path.read_text())
        old_signature = spec_signature(EvalSpec(**old["spec"]), dtype=cell_dtype(old))
        same_mode = one_prompt_is_aware(old["task"].get("query_aware")) == one_prompt_is_aware(query_mode(spec))
        return bool(old.get("complete")) and old_signature == spec_signature(spec) and same_mode
    except (ValueError, KeyError, TypeError):
        return False


def compare(
    policies: Sequence[str | tuple[str, dict[str, Any]]],
    ratios: Sequence[float] | None,
    tasks: Sequence[str],
    out_dir: str | Path,
    base: dict[str, Any] | None = None,
    resume: bool = True,
    on_cell: Callable[[CellDone], None] | None = None,
    task_options: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Evaluate every (task, policy, ratio) cell, one JSON file per cell in ``out_dir/cells``; returns the summary
    (also written to ``out_dir/compare.json``). A policy is a preset name / YAML path (labelled by its resolved name:
    the preset's, or the file's ``name:`` or stem), or a ``(label, document)`` pair. ``ratios=None`` runs each policy
    at its own ratio. ``full`` is not run as a policy: its row is the full-cache side shared by all cells of a task.
    ``on_cell`` is called after each computed cell (not for the ones resumed).

    Every cell is validated (model name, task, options, policy) before anything is written or any model loads."""
    out = Path(out_dir)
    cells = plan_cells(policies, ratios, tasks, dict(base or {}), task_options)
    (out / "cells").mkdir(parents=True, exist_ok=True)
    todo = [(label, task, ratio, spec, out / "cells" / f"{cell_name(task, label, ratio)}.json")
            for label, task, ratio, spec in cells]
    todo = [cell for cell in todo if not (resume and is_done(cell[4], cell[3]))]
    store = store_for(todo[0][3]) if todo else None  # one store for every cell of the grid
    try:
        for label, task, ratio, spec, path in todo:
            t0 = time.perf_counter()
            result = runner.evaluate(spec, prefill_store=store)
            write_result(path, result, label=label)
            if on_cell is not None:
                on_cell(CellDone(task, label, ratio, result, time.perf_counter() - t0))
    finally:
        if store is not None:
            store.close()
    labels = ["full", *dict.fromkeys(label for label, _, _, _ in cells)]
    summary = summarize(out, labels, sorted({r for _, _, r, _ in cells}), tasks)
    write_json_atomic(out / "compare.json", summary)
    return summary


def summarize(
    out_dir: str | Path,
    policies: Sequence[str] | None = None,
    ratios: Sequence[float] | None = None,
    tasks: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Read the cell files of a grid into ``{task: {policy: {ratio: metrics}}}`` (``full`` under ratio 0)."""
    cells: dict[str, dict[str, dict[str, Any]]] = {}
    meta: dict[str, Any] = {}
    for path in sorted(Path(out_dir, "cells").glob("*.json")):
        doc = json.loads(path.read_text())
        task, pol, ratio = doc["task"]["name"], doc["spec"]["policy"], cell_ratio(doc)
        if tasks is not None and task not in tasks:
            continue
        if ratios is not None and ratio not in ratios:
            continue
        name = doc.get("label") or (pol if isinstance(pol, str) else doc["policy_name"])
        if policies is not None and name not in policies:
            continue
        entry = cells.setdefault(task, {})
        pm, fm = doc["policy_metrics"], doc["full"]
        entry.setdefault(name, {})[f"{ratio:g}"] = cell_summary(pm, doc)
        entry.setdefault("full", {})["0"] = cell_summary(fm, doc, full=True)
        meta.setdefault(
            task,
            {
                "samples": len(doc["samples"]),
                "options": doc["task"].get("options"),
                "query_aware": doc["task"].get("query_aware"),
                "model": doc["model"].get("name"),
                "dtype": doc["model"].get("dtype"),
                "honesty": doc["honesty"],
                "environment": doc["environment"],
                "by_kind_full": by_kind(doc, "full"),
            },
        )
        meta[task].setdefault("trial_s", {})[f"{name}@{ratio:g}"] = doc["wall_s"]
        meta[task].setdefault("prefill", {})[f"{name}@{ratio:g}"] = doc.get("prefill")
        meta[task].setdefault("by_kind", {})[f"{name}@{ratio:g}"] = by_kind(doc, "policy")
    return {"cells": cells, "meta": meta}


def by_kind(doc: dict[str, Any], side: str) -> dict[str, dict[str, float]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for s in doc["samples"]:
        groups.setdefault(s["kind"], []).append(s[side])
    out = {}
    for kind, rows in groups.items():
        n = sum(r["scored_tokens"] for r in rows)
        em = [r["exact_match"] for r in rows if r.get("exact_match") is not None]
        rl = [r["rouge_l"] for r in rows if r.get("rouge_l") is not None]
        out[kind] = {
            "n": len(rows),
            "ppl": math.exp(sum(r["nll_sum"] for r in rows) / n) if n else float("nan"),
            "exact_match": sum(em) / len(em) if em else None,
            "rouge_l": sum(rl) / len(rl) if rl else None,
        }
    return out


def cell_summary(m: dict[str, Any], doc: dict[str, Any], full: bool = False) -> dict[str, Any]:
    keys = ("ppl", "kl", "top1", "rouge_l", "exact_match", "exact_match_macro")
    out = {k: m.get(k) for k in keys}
    out.update({f"{k}_ci": m.get(f"{k}_ci") for k in keys})
    if not full:
        for k, d in doc["delta"].items():
            out[f"delta_{k}"] = d["value"]
            out[f"delta_{k}_ci"] = d["ci"]
    out.update(
        kept_prefill=m["kept_tokens_prefill"],
        prompt_tokens=m["prompt_tokens"],
        ratio_prefill=m["ratio_prefill"],
        ratio_end=m["ratio_end"],
        bytes_end=m["bytes_end"],
        prefill_s=m["prefill_s"],
        decode_s=m["decode_s"],
        decode_tokens_per_s=m["decode_tokens_per_s"],
    )
    return out


__all__ = [
    "CellDone",
    "RUN_ONLY_FIELDS",
    "by_kind",
    "cell_dtype",
    "cell_name",
    "cell_ratio",
    "cell_summary",
    "compare",
    "is_done",
    "spec_signature",
    "summarize",
]
