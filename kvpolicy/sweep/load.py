"""Reading sweep and ablation files: YAML, command-line overrides, and every check that needs no model (the policy
and each search path resolved, the sampler and pruning settings, the storage URL, the model name and the task through
the evaluator's own ``check``). All problems are raised together as one :class:`SweepConfigError`."""

from __future__ import annotations

import copy
import importlib.util
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from ..config import ConfigIssue, PolicyConfigError, read_policy_document, resolve_policy
from ..errors import issues_from_validation
from .evaluators import EvaluatorLookupError, get_evaluator_class
from .space import check_policy_space
from ..models import model_problem
from .spec import PREFILL_SETTINGS, AblationSpec, SweepConfigError, SweepSpec

__all__ = ["load_ablation", "load_sweep", "read_yaml_file"]


def read_yaml_file(path: str | Path) -> dict[str, Any]:
    """A YAML mapping from ``path``; a syntax error names the line and column."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise SweepConfigError(f"cannot read {str(p)!r}: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        what = exc.problem or "invalid YAML"
        if exc.context:
            what += f" ({exc.context})"
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "somewhere"
        raise SweepConfigError(ConfigIssue("yaml", f"syntax error at {where}: {what}"), str(p)) from None
    except yaml.YAMLError as exc:
        raise SweepConfigError(ConfigIssue("yaml", f"YAML error: {exc}"), str(p)) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SweepConfigError(
            ConfigIssue("", f"the file must hold a mapping of fields, got {type(data).__name__}"), str(p)
        )
    return data


def _apply_overrides(data: dict[str, Any], overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    data = copy.deepcopy(data)
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if key in PREFILL_SETTINGS:  # settings of the file's task (the evaluator's)
            task = data.get("task")
            data["task"] = {**(task if isinstance(task, Mapping) else {}), key: value}
        elif key in ("wandb_project",):
            w = data.get("wandb")
            w = {"enabled": bool(w)} if isinstance(w, bool) else dict(w or {}) if not isinstance(w, str) else \
                {"project": w}
            w["project"] = value
            w.setdefault("enabled", True)
            data["wandb"] = w
        elif key == "no_wandb":
            if value:
                data["wandb"] = False
        else:
            data[key] = value
    return data



def _evaluator_issues(evaluator: str, model: str, task: dict[str, Any], samples: int, metrics: list[str],
                      prefix: str = "") -> list[ConfigIssue]:
    try:
        cls = get_evaluator_class(evaluator)
    except EvaluatorLookupError as exc:
        return [ConfigIssue("evaluator", str(exc))]
    issues = []
    if getattr(cls, "needs_model", True):
        problem = model_problem(model)
        if problem:
            issues.append(ConfigIssue("model", problem))
    try:
        issues += list(cls.check(model=model, task=task, samples=samples, metrics=metrics))
    except Exception as exc:  # noqa: BLE001 - an evaluator's check must not crash validation
        issues.append(ConfigIssue("task", f"the evaluator could not check the task: {type(exc).__name__}: {exc}"))
    return issues


def _validated(model: Any, source: str | Path | Mapping[str, Any], overrides: Mapping[str, Any] | None) -> Any:
    """``(spec, file)``: a sweep or ablation file (or mapping) with the command-line ``overrides`` laid over it,
    validated against ``model`` (a file's name defaults to its stem); ``file`` is ``None`` for a mapping."""
    where = None
    if isinstance(source, Mapping):
        data = copy.deepcopy(dict(source))
    else:
        where = str(source)
        data = read_yaml_file(source)
        data.setdefault("name", _default_name(Path(source)))
    data = _apply_overrides(data, overrides)
    try:
        return model.model_validate(data), where
    except ValidationError as exc:
        raise SweepConfigError(issues_from_validation(exc, model), where) from None


def load_sweep(source: str | Path | Mapping[str, Any], overrides: Mapping[str, Any] | None = None,
               deep: bool = True) -> SweepSpec:
    """Read and validate a sweep file (or mapping). ``overrides`` are command-line values laid over the file's
    (``n_trials``, ``samples``, ``output``, ``storage``, ``timeout``, ``wandb_project``, ``no_wandb``, and the task's
    prefill settings :data:`~.spec.PREFILL_SETTINGS`). The policy and
    every search path are always checked; with ``deep`` (the default) also the model name, the task and the metrics
    it produces (through the evaluator's ``check``; nothing is loaded). Raises :class:`SweepConfigError`."""
    spec, where = _validated(SweepSpec, source, overrides)
    issues: list[ConfigIssue] = []
    if spec.multi_objective and spec.pruning.enabled and spec.pruning.pruner != "none":
        issues.append(ConfigIssue(
            "pruning",
            f"pruning needs a single objective (Optuna does not prune multi-objective studies; this sweep has "
            f"{len(spec.objectives)}: {', '.join(spec.metrics)}); set pruning: false or keep one objective"))
    dup = sorted({m for m in spec.metrics if spec.metrics.count(m) > 1})
    if dup:
        issues.append(ConfigIssue("objectives", f"metric listed twice: {', '.join(dup)}"))
    if spec.sampler.name == "grid" and spec.conditional:
        path = next(k for k, p in spec.space.items() if p.when)
        issues.append(ConfigIssue(f"space.{path}.when", "the grid sampler cannot search a conditional space (a grid "
                                                        "sets every parameter in every trial); use sampler: tpe, "
                                                        "random or nsgaii"))
    elif spec.sampler.name == "grid":
        for path, p in spec.space.items():
            if p.grid_values() is None:
                issues.append(ConfigIssue(f"space.{path}", "the grid sampler needs a step for a float range "
                                                           "(or use a categorical)"))
    if spec.sampler.name == "nsgaii" and spec.sampler.population_size is not None and spec.n_trials is not None \
            and spec.sampler.population_size > spec.n_trials:
        issues.append(ConfigIssue("sampler.population_size", f"{spec.sampler.population_size} is more than n_trials "
                                  f"({spec.n_trials}): NSGA-II would never leave its random first generation"))
    if spec.sampler.name != "tpe" and spec.sampler.n_startup_trials is not None:
        issues.append(ConfigIssue("sampler.n_startup_trials", f"only the tpe sampler takes it (sampler is "
                                                              f"{spec.sampler.name!r})"))
    if spec.sampler.name != "nsgaii" and spec.sampler.population_size is not None:
        issues.append(ConfigIssue("sampler.population_size", f"only the nsgaii sampler takes it (sampler is "
                                                             f"{spec.sampler.name!r})"))
    if spec.storage:
        issues += _storage_issues(spec.storage)
    issues += check_policy_space(spec.policy, spec.space)
    if deep:
        issues += _evaluator_issues(spec.evaluator, spec.model, spec.task, spec.samples, spec.metrics)
    if issues:
        raise SweepConfigError(issues, where)
    return spec


def _storage_issues(url: str) -> list[ConfigIssue]:
    try:
        from sqlalchemy.engine import make_url

        u = make_url(url)
    except Exception as exc:  # noqa: BLE001 - sqlalchemy raises ArgumentError and friends
        return [ConfigIssue("storage", f"not a storage URL ({exc}); e.g. sqlite:///study.db or "
                                       "postgresql://user:pass@host:5432/db")]
    driver = u.drivername.split("+")[0]
    if driver not in ("sqlite", "postgresql", "mysql", "mariadb", "oracle", "mssql"):
        return [ConfigIssue("storage", f"unsupported storage scheme {u.drivername!r}; use sqlite:///FILE, "
                                       "postgresql://... or mysql://...")]
    if driver == "postgresql" and "+" not in u.drivername:
        if importlib.util.find_spec("psycopg2") is None and importlib.util.find_spec("psycopg") is None:
            return [ConfigIssue("storage", "a PostgreSQL storage needs a driver: pip install psycopg2-binary")]
    return []


def _default_name(path: Path) -> str:
    stem = re.sub(r"[^A-Za-z0-9_.\-]+", "-", path.stem).strip("-.") or "sweep"
    return stem


def load_ablation(source: str | Path | Mapping[str, Any], overrides: Mapping[str, Any] | None = None,
                  deep: bool = True) -> AblationSpec:
    """Read and validate an ablation file: every variant at every budget must resolve; metrics must be known and
    produced by the task. Raises :class:`SweepConfigError`."""
    spec, where = _validated(AblationSpec, source, overrides)
    issues: list[ConfigIssue] = []
    for i, budget in enumerate(spec.budgets):
        bad = [k for k in budget if k not in ("ratio", "tokens", "decode_budget")]
        if bad:
            issues.append(ConfigIssue(f"budgets[{i}]", f"unknown budget field(s) {', '.join(bad)}; allowed: ratio, "
                                                       "tokens, decode_budget"))
    if not issues:
        try:
            base_doc, _ = read_policy_document(spec.base)
        except PolicyConfigError as exc:
            issues.append(ConfigIssue("base", str(exc)))
            base_doc = None
        if base_doc is not None:
            budget_ok = []
            for bi, budget in enumerate(spec.budgets):
                try:
                    resolve_policy(base_doc, overrides=budget)
                    budget_ok.append(budget)
                except PolicyConfigError as exc:
                    issues.append(ConfigIssue(f"budgets[{bi}]" if budget else "base",
                                              "; ".join(str(x) for x in exc.issues)))
            for vi, variant in enumerate(spec.variants):
                failures: dict[str, list[str]] = {}
                for budget in budget_ok:
                    try:
                        resolve_policy(base_doc, overrides={**variant.set, **budget})
                    except PolicyConfigError as exc:
                        msgs = "; ".join(str(x) for x in exc.issues)
                        failures.setdefault(msgs, []).append(json.dumps(budget))
                for msgs, budgets in failures.items():
                    at = "" if len(budgets) == len(budget_ok) else f" at budget {', '.join(budgets)}"
                    issues.append(ConfigIssue(f"variants[{vi}].set", f"variant {variant.name!r}{at}: {msgs}"))
    if deep:
        for issue in _evaluator_issues(spec.evaluator, spec.model, spec.task, spec.samples, spec.metrics):
            path = re.sub(r"^objectives\[(\d+)\]\.metric$", r"metrics[\1]", issue.path)
            issues.append(ConfigIssue(path, issue.message))
    if issues:
        # the same variant failing at every budget is one problem
        issues = list(dict.fromkeys(issues))
        raise SweepConfigError(issues, where)
    return spec
