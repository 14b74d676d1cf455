"""One trial of a sweep: suggest its parameters, evaluate the policy (or reuse the result of a finished trial with the
same parameters), and record it: the storage first, then the local results files, then W&B - so a W&B failure never
loses a trial. A trial abandoned by a stopping worker is failed and re-queued with the same parameters."""

from __future__ import annotations

import contextlib
import copy
import json
import math
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import policy_to_dict, read_policy_document, resolve_policy
from ..io import append_jsonl, atomic_write_text, json_default
from .conditions import branch_label
from .evaluation import BatchReport, Evaluation
from .records import complete_trials, finite, fmt, trial_record, write_tables
from .space import expand_params, suggest_params
from .spec import SweepSpec
from .stopping import held_interrupts
from .storage import ATTR_PREFIX, retry_callback, trial_id

__all__ = ["TrialRun", "fail_and_requeue", "run_trial", "tell"]


@dataclass
class TrialRun:
    """What every trial of one worker shares: the study and its storage, the sweep, the evaluator, where progress and
    messages go, and where results are written."""

    study: Any
    storage: Any
    spec: SweepSpec
    evaluator: Any
    progress: Any
    samples_task: int
    out: Path
    tracker: Any
    console: Any
    quiet: bool


def tell(study: Any, storage: Any, trial: Any, values: Sequence[float] | None = None, state: Any = None) -> None:
    """``study.tell`` outside ``optimize``: the grid sampler calls ``study.stop()`` once the grid is exhausted, which
    raises outside ``optimize`` *after* the trial was recorded - that is not a failure."""
    try:
        study.tell(trial, values, state=state)
    except RuntimeError:
        if not storage.get_trial(trial_id(storage, study, trial.number)).state.is_finished():
            raise


def _find_same_params(study: Any, params: Mapping[str, Any], number: int) -> Any:
    for t in complete_trials(study):
        if t.number != number and t.params == dict(params) and t.user_attrs.get(ATTR_PREFIX + "metrics"):
            return t
    return None


def _small(obj: Any, limit: int = 20000) -> Any:
    text = json.dumps(obj, default=json_default)
    if len(text) <= limit:
        return obj
    return {"truncated": True, "keys": list(obj) if isinstance(obj, dict) else None}


def run_trial(run: TrialRun, trial: Any) -> str:
    """Evaluate one trial and record it: storage first, then the local files, then W&B. Returns complete | reused |
    pruned | failed. KeyboardInterrupt propagates (the caller fails and re-queues the trial)."""
    import optuna
    from optuna.trial import TrialState

    t0 = time.perf_counter()
    params = suggest_params(trial, run.spec.space)
    trial.set_user_attr(ATTR_PREFIX + "branch", branch_label(params, run.spec.space))
    label = ", ".join(f"{k}={fmt(v)}" for k, v in params.items())
    run.progress.update(run.samples_task, description=f"trial {trial.number}", completed=0, total=run.spec.samples,
                        visible=True, info=label)
    history: list[dict[str, Any]] = []
    try:
        doc, _ = read_policy_document(run.spec.policy)
        policy = policy_to_dict(resolve_policy(doc, overrides=expand_params(params)))
        trial.set_user_attr(ATTR_PREFIX + "policy", policy)
        same = _find_same_params(run.study, params, trial.number)
        if same is not None:
            return _reuse(run, trial, same, history)
        values = _evaluate(run, trial, policy, history)
        if not run.quiet:
            run.console.print(f"trial {trial.number} ({time.perf_counter() - t0:.1f} s): {label} -> "
                              + ", ".join(f"{m} {v:.5g}" for m, v in zip(run.spec.metrics, values, strict=False)),
                              soft_wrap=True)
        return "complete"
    except optuna.TrialPruned as exc:
        tell(run.study, run.storage, trial, state=TrialState.PRUNED)
        after_trial(run, trial.number, history, {})
        if not run.quiet:
            run.console.print(f"trial {trial.number}: {label} -> pruned ({exc})")
        return "pruned"
    except Exception as exc:  # noqa: BLE001 - a failing trial is recorded, the sweep goes on
        msg = f"{type(exc).__name__}: {exc}"
        with contextlib.suppress(Exception):
            trial.set_user_attr(ATTR_PREFIX + "error", msg[:2000])
        tell(run.study, run.storage, trial, state=TrialState.FAIL)
        after_trial(run, trial.number, history, {})
        run.console.print(f"[yellow]trial {trial.number}: {label} failed: {msg}[/]")
        return "failed"


def _reuse(run: TrialRun, trial: Any, same: Any, history: list[dict[str, Any]]) -> str:
    """Record the result of the finished trial ``same`` (identical parameters) for ``trial``: evaluation is
    deterministic (same model, same samples), so it is not repeated."""
    trial.set_user_attr(ATTR_PREFIX + "metrics", dict(same.user_attrs[ATTR_PREFIX + "metrics"]))
    trial.set_user_attr(ATTR_PREFIX + "reused_from", same.number)
    tell(run.study, run.storage, trial, list(same.values))
    after_trial(run, trial.number, history, {})
    run.progress.update(run.samples_task, completed=run.spec.samples)
    return "reused"


def _evaluate(run: TrialRun, trial: Any, policy: Mapping[str, Any], history: list[dict[str, Any]]) -> list[float]:
    """Evaluate ``policy`` (pruning after each batch when the sweep prunes), record the trial, return its values."""
    import optuna

    spec = run.spec

    def on_batch(rep: BatchReport) -> None:
        history.append({"step": rep.step, "done": rep.done, **rep.metrics})
        run.progress.update(run.samples_task, completed=rep.done, total=rep.total)
        if not spec.multi_objective and spec.pruning.enabled:
            value = rep.metrics.get(spec.metrics[0])
            if value is not None and math.isfinite(value):
                trial.report(float(value), rep.step)
                if trial.should_prune():
                    raise optuna.TrialPruned(f"pruned at batch {rep.step} ({spec.metrics[0]} {value:.4g})")

    ev: Evaluation = run.evaluator.evaluate(policy, on_batch)
    missing = [m for m in spec.metrics if m not in ev.metrics]
    if missing:
        raise RuntimeError(f"the evaluator did not report {', '.join(missing)} (it gave {', '.join(ev.metrics)})")
    values = [float(ev.metrics[m]) for m in spec.metrics]
    if not all(math.isfinite(v) for v in values):
        raise RuntimeError(f"non-finite objective values {dict(zip(spec.metrics, values, strict=False))}")
    trial.set_user_attr(ATTR_PREFIX + "metrics", {k: finite(float(v)) for k, v in ev.metrics.items()})
    details = json.loads(json.dumps(ev.details, default=json_default))
    trial.set_user_attr(ATTR_PREFIX + "details", _small(details))
    tell(run.study, run.storage, trial, values)
    after_trial(run, trial.number, history, details, ev.document)
    return values


def after_trial(run: TrialRun, number: int, history: list[dict[str, Any]], details: Mapping[str, Any],
                document: Mapping[str, Any] | None = None) -> None:
    """The local results files (log line, tables, per-trial JSON), then W&B - whose failure is only a warning."""
    trials = run.study.get_trials(deepcopy=False)
    t = trials[number] if number < len(trials) and trials[number].number == number else \
        next(x for x in trials if x.number == number)
    rec = trial_record(t, run.spec.metrics)
    append_jsonl(run.out / "trials.jsonl", rec)
    full = {**rec, "policy": t.user_attrs.get(ATTR_PREFIX + "policy"), "history": history, "details": details}
    atomic_write_text(run.out / "trials" / f"trial-{number:04d}.json", json.dumps(full, indent=1,
                                                                                   default=json_default))
    if document is not None:  # the evaluator's own complete result (kvpolicy.eval's EvalResult)
        atomic_write_text(run.out / "trials" / f"trial-{number:04d}.eval.json",
                          json.dumps(document, indent=1, default=json_default))
    write_tables(run.study, run.spec, run.out)
    try:
        run.tracker.log_trial(t, run.spec, history, details)
    except Exception as exc:  # noqa: BLE001 - the trial is safe in the storage and the local files
        run.console.print(f"[yellow]warning: W&B logging of trial {number} failed ({type(exc).__name__}: {exc}); "
                          "the trial is kept in the study and the results files[/]")


def fail_and_requeue(study: Any, storage: Any, trial: Any, spec: SweepSpec, out: Path, reason: str) -> None:
    """Fail a trial this worker is abandoning (Ctrl-C, SIGTERM) and queue a copy with the same parameters."""
    import optuna
    from optuna.trial import TrialState

    with held_interrupts(), contextlib.suppress(Exception):
        tid = trial_id(storage, study, trial.number)
        if storage.get_trial(tid).state != TrialState.RUNNING:
            return
        storage.set_trial_user_attr(tid, ATTR_PREFIX + "error", reason)
        if storage.set_trial_state_values(tid, state=TrialState.FAIL):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                retry_callback(spec.max_retries)(study, copy.deepcopy(storage.get_trial(tid)))
        write_tables(study, spec, out)
