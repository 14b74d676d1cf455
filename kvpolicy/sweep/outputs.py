"""What a study leaves in its results folder: the tables, the best policy as a ready-to-use YAML (and every Pareto
policy under ``pareto/``), ``summary.json`` (best trials, Pareto front, parameter importances) and the plots."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..io import atomic_write_text, json_default
from ..provenance import versions
from .harness import HarnessEvaluator
from .importance import importance_warning, importances
from .plots import write_plots
from .records import best_trials, complete_trials, knee, trial_record, write_tables
from .spec import SweepSpec
from .storage import ATTR_PREFIX, safe_url

__all__ = ["policy_yaml", "trial_evaluation", "write_study_outputs"]


def trial_evaluation(t: Any, spec: SweepSpec) -> dict[str, Any] | None:
    """How a harness trial was measured, as a policy file's ``evaluation:`` section (every setting that decides its
    numbers: model, task and options, samples, seed, batch size, the dtype it ran in, ...), so that
    ``kvpolicy run --policy best_policy.yaml`` repeats the trial. ``None`` for other evaluators."""
    if spec.evaluator != "harness":
        return None
    from ..eval.preflight import EVALUATION_FIELDS

    settings = HarnessEvaluator.eval_spec(spec.model, spec.task, spec.samples, spec.batch_size).model_dump()
    out = {k: settings[k] for k in EVALUATION_FIELDS if settings.get(k) is not None}
    ran_in = ((t.user_attrs.get(ATTR_PREFIX + "details") or {}).get("dtype") or "").removeprefix("torch.")
    if ran_in in ("bfloat16", "float16", "float32"):  # the dtype the model really had (an 'auto' setting resolved)
        out["dtype"] = ran_in
    return out


def policy_yaml(t: Any, spec: SweepSpec, label: str) -> str:
    import yaml

    doc = dict(t.user_attrs.get(ATTR_PREFIX + "policy") or {})
    doc["name"] = f"{spec.name}-trial-{t.number}"  # not its preset's name: tables must not call it 'elastic'
    evaluation = trial_evaluation(t, spec)
    if evaluation is not None:
        doc["evaluation"] = evaluation
    vals = ", ".join(f"{m} {v:.6g}" for m, v in zip(spec.metrics, t.values, strict=False))
    branch = t.user_attrs.get(ATTR_PREFIX + "branch")
    head = (f"# {label}: study {spec.name!r}, trial {t.number} ({vals})\n"
            f"# parameters: {json.dumps(t.params)}\n"
            + (f"# branch: {branch}\n" if branch else "")
            + "# load with kvpolicy.config.load_policy('<this file>')"
            + ("; re-measure with `kvpolicy run --policy <this file>` (evaluation: below)\n" if evaluation else "\n"))
    return head + yaml.safe_dump(doc, sort_keys=False)


def write_study_outputs(study: Any, spec: SweepSpec, out: Path, plots: bool = True,
                        extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Tables, best policy YAML(s), ``summary.json`` and plots for ``study``. Returns the summary."""
    from optuna.trial import TrialState

    out.mkdir(parents=True, exist_ok=True)
    rows = write_tables(study, spec, out)
    best = best_trials(study, spec)
    counts = {s.name: 0 for s in TrialState}
    for t in study.get_trials(deepcopy=False):
        counts[t.state.name] += 1
    summary: dict[str, Any] = {
        "schema": "kvpolicy.sweep/1",
        "study": spec.name,
        "storage": safe_url(spec.storage_url()),
        "objectives": [o.model_dump() for o in spec.objectives],
        "trials": counts,
        "target_trials": spec.target_trials(),
        "best_trials": [trial_record(t, spec.metrics) for t in best],
        "pareto_front": spec.multi_objective,
        "importances": importances(study, spec),
        "importance_warning": importance_warning(study),
        "sweep": json.loads(spec.model_dump_json()),
        "written": datetime.now(timezone.utc).isoformat(),
        "versions": versions(),
        **dict(extra or {}),
    }
    chosen = None
    if best:
        chosen = best[0] if not spec.multi_objective else knee(best, spec.directions)
        summary["chosen_trial"] = chosen.number
        summary["chosen_rule"] = "best value" if not spec.multi_objective else \
            "Pareto trial closest to the ideal point (objectives scaled to [0, 1] over the front)"
        atomic_write_text(out / "best_policy.yaml", policy_yaml(chosen, spec, "best policy" if not
                                                                 spec.multi_objective else "chosen Pareto policy"))
        if spec.multi_objective:
            pdir = out / "pareto"
            keep = set()
            for t in best:
                name = f"trial-{t.number:04d}.yaml"
                keep.add(name)
                atomic_write_text(pdir / name, policy_yaml(t, spec, "Pareto policy"))
            for old in pdir.glob("trial-*.yaml"):
                if old.name not in keep:
                    old.unlink(missing_ok=True)
    if plots:
        drawn = write_plots(study, spec, out, rows, chosen=None if chosen is None else chosen.number)
        summary["plots"] = [str(p.relative_to(out)) for p in drawn]
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1, default=json_default) + "\n")
    return summary

