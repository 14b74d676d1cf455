"""Parameter importances of a study, and the warning when they rest on too few trials to be read as a ranking.

The evaluator is pinned to Optuna's PED-ANOVA (:class:`optuna.importance.PedAnovaImportanceEvaluator`, Optuna's
default from version 5; fANOVA before, which needs scikit-learn): the same method on every supported Optuna, no extra
dependency, and it handles conditional parameters (a parameter only some trials set). PED-ANOVA asks how differently
a parameter is distributed over the best ``target_quantile`` of the trials (Optuna's default, the best 10%) than over
all of them. Optuna's documentation asks for at least 5 trials in that top quantile for a stable result; with the
top 10% of ``n`` trials being ``ceil(0.1 n)`` trials, that is **41 completed trials** (:data:`MIN_TRIALS`), counted
per parameter (a conditional parameter only has the trials of its branch). Below that, a ranking can be plain noise:
after 3 trials the top "quantile" is the single best trial, and a part choice that moved perplexity from 66 to 18 was
ranked at 0.01. So below :data:`MIN_TRIALS` the importances are still computed, but ``summary.json``, the report and
the importance plots carry :func:`importance_warning`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

from .records import complete_trials
from .spec import SweepSpec

__all__ = ["IMPORTANCE_QUANTILE", "MIN_TOP_TRIALS", "MIN_TRIALS", "importance_evaluator", "importance_target",
           "importance_warning", "importances", "trials_per_param"]

#: PED-ANOVA's top quantile (Optuna's default): importance = what it takes to reach the best 10% of the trials
IMPORTANCE_QUANTILE = 0.1
#: trials Optuna's documentation asks for in that top quantile
MIN_TOP_TRIALS = 5
#: completed trials setting a parameter before its importance is read as a ranking (the top quantile holds 5)
MIN_TRIALS = next(n for n in range(1, 10_000) if math.ceil(IMPORTANCE_QUANTILE * n) >= MIN_TOP_TRIALS)


def importance_evaluator() -> Any:
    from optuna.importance import PedAnovaImportanceEvaluator

    return PedAnovaImportanceEvaluator(target_quantile=IMPORTANCE_QUANTILE)


def importance_target(spec: SweepSpec, i: int) -> Callable[[Any], float]:
    """Objective ``i`` as PED-ANOVA reads a target: lower is better (a maximised metric is negated)."""
    sign = 1.0 if spec.directions[i] == "minimize" else -1.0
    return lambda t: sign * t.values[i]


def importances(study: Any, spec: SweepSpec) -> dict[str, dict[str, float]]:
    """Per objective: parameter -> importance (summing to 1), from 5 completed trials on; ``{}`` before."""
    import optuna

    out: dict[str, dict[str, float]] = {}
    done = complete_trials(study)
    if len(done) < 5 or not any(t.params for t in done):
        return out
    for i, m in enumerate(spec.metrics):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                imp = optuna.importance.get_param_importances(study, evaluator=importance_evaluator(),
                                                              target=importance_target(spec, i))
            out[m] = {k: float(v) for k, v in imp.items()}
        except Exception:  # noqa: BLE001 - too few distinct values, a single parameter...
            continue
    return out


def trials_per_param(study: Any) -> dict[str, int]:
    """Completed trials that set each parameter (a conditional parameter: the trials of its branch)."""
    counts: dict[str, int] = {}
    for t in complete_trials(study):
        for name in t.params:
            counts[name] = counts.get(name, 0) + 1
    return counts


def importance_warning(study: Any) -> str | None:
    """One line when some parameter's importance rests on fewer than :data:`MIN_TRIALS` completed trials, naming
    them with their counts; ``None`` when every parameter has enough."""
    short = {name: n for name, n in trials_per_param(study).items() if n < MIN_TRIALS}
    if not short:
        return None
    listed = ", ".join(f"{name} ({n})" for name, n in sorted(short.items(), key=lambda kv: (kv[1], kv[0])))
    return (f"too few trials for parameter importances: {listed} completed trial(s) per parameter; PED-ANOVA needs "
            f"{MIN_TOP_TRIALS} in its best {IMPORTANCE_QUANTILE:.0%}, i.e. >= {MIN_TRIALS} trials setting a "
            f"parameter, before importances rank anything - read them as noise until then")
