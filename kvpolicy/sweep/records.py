"""The trials of a study as rows: the trials table (``trials.json`` / ``trials.csv``, rewritten from the storage, the
source of truth), the best trials (single objective) or Pareto front, and the Pareto trial closest to the ideal
point."""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..io import atomic_write_text, json_default
from .conditions import branch_label
from .spec import SweepSpec
from .storage import ATTR_PREFIX

__all__ = ["best_trials", "complete_trials", "finite", "fmt", "knee", "table_rows", "trial_record",
           "write_tables"]


def finite(x: Any) -> Any:
    """``x``, or ``None`` for a non-finite float (JSON and the storage have no NaN)."""
    return x if not isinstance(x, float) or math.isfinite(x) else None


def fmt(v: Any) -> str:
    """A value for a table cell or a log line: floats to 4 significant digits."""
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def trial_record(t: Any, spec_metrics: Sequence[str]) -> dict[str, Any]:
    """One row of the trials table: number, state, objective values, every metric, parameters, policy, timing."""
    attrs = t.user_attrs
    rec: dict[str, Any] = {
        "number": t.number,
        "state": t.state.name,
    }
    values = list(t.values) if t.values is not None else [None] * len(spec_metrics)
    for m, v in zip(spec_metrics, values, strict=False):
        rec[m] = v
    for k, v in (attrs.get(ATTR_PREFIX + "metrics") or {}).items():
        rec.setdefault(k, v)
    for k, v in t.params.items():
        rec[f"params.{k}"] = v
    # the part / branch choices the trial took (conditional spaces: which parameters it has; kvpolicy.sweep.conditions)
    rec["branch"] = attrs.get(ATTR_PREFIX + "branch")
    rec["policy_name"] = (attrs.get(ATTR_PREFIX + "policy") or {}).get("name")
    rec["duration_s"] = t.duration.total_seconds() if t.duration is not None else None
    rec["datetime_start"] = t.datetime_start.isoformat() if t.datetime_start else None
    rec["datetime_complete"] = t.datetime_complete.isoformat() if t.datetime_complete else None
    worker = attrs.get(ATTR_PREFIX + "worker") or {}
    rec["worker"] = f"{worker.get('host')}:{worker.get('pid')}" if worker else None
    rec["retry_of"] = t.system_attrs.get("failed_trial")
    rec["reused_from"] = attrs.get(ATTR_PREFIX + "reused_from")
    rec["error"] = attrs.get(ATTR_PREFIX + "error")
    return rec


def table_rows(study: Any, spec: SweepSpec) -> list[dict[str, Any]]:
    trials = study.get_trials(deepcopy=False)
    rows = [trial_record(t, spec.metrics) for t in trials]
    pareto = {t.number for t in best_trials(study, spec)}
    for t, r in zip(trials, rows, strict=True):
        r["pareto"] = r["number"] in pareto
        if r["branch"] is None and t.params:  # a study recorded before trials carried their branch
            r["branch"] = branch_label(t.params, spec.space)
    return rows


def write_tables(study: Any, spec: SweepSpec, out: Path) -> list[dict[str, Any]]:
    """``trials.json`` and ``trials.csv`` from the storage (the source of truth), written atomically."""
    rows = table_rows(study, spec)
    atomic_write_text(out / "trials.json", json.dumps(rows, indent=1, default=json_default) + "\n")
    cols: list[str] = []
    for r in rows:
        for k in r:
            if k not in cols:
                cols.append(k)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in r.items()})
    atomic_write_text(out / "trials.csv", buf.getvalue())
    return rows


def complete_trials(study: Any) -> list[Any]:
    from optuna.trial import TrialState

    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def best_trials(study: Any, spec: SweepSpec) -> list[Any]:
    done = complete_trials(study)
    if not done:
        return []
    if not spec.multi_objective:
        sign = 1 if spec.directions[0] == "minimize" else -1
        return [min(done, key=lambda t: sign * t.values[0])]
    return list(study.best_trials)


def knee(trials: Sequence[Any], directions: Sequence[str]) -> Any:
    """The Pareto trial closest to the ideal point, each objective scaled to [0, 1] over the front (0 = best)."""
    vals = np.array([t.values for t in trials], dtype=np.float64)
    signs = np.array([1.0 if d == "minimize" else -1.0 for d in directions])
    v = vals * signs
    lo, hi = v.min(axis=0), v.max(axis=0)
    scaled = (v - lo) / np.where(hi > lo, hi - lo, 1.0)
    return trials[int(np.argmin(np.linalg.norm(scaled, axis=1)))]

