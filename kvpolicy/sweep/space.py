"""The search space: ranges of dotted policy paths, their values as policy overrides, and the check that every path
and value gives a valid policy in every branch of a conditional space (before anything loads); Optuna suggestions
come from here too, define-by-run (:mod:`.conditions`)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..config import ConfigIssue, PolicyConfigError, read_policy_document, resolve_policy
from .conditions import MAX_BRANCHES, active_paths, branches, is_active, order, show, when_issues

__all__ = ["SpaceParam", "check_policy_space", "expand_params", "suggest_params"]


class SpaceParam(BaseModel):
    """A search range for one dotted path: ``{type: float, low, high, step?, log?}``, ``{type: int, ...}`` or
    ``{type: categorical, choices: [...]}`` (a bare list is a categorical). ``when: {switch: choice or [choices]}``
    searches the parameter only in trials whose categorical ``switch`` took one of those choices
    (:mod:`kvpolicy.sweep.conditions`)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["float", "int", "categorical"] = Field(description="float | int | categorical")
    low: float | None = None
    high: float | None = None
    step: float | None = Field(default=None, gt=0)
    log: bool = False
    choices: list[bool | int | float | str | None] | None = None
    when: dict[str, list[bool | int | float | str | None]] | None = Field(
        default=None, description="categorical parameter of this space -> the choice(s) for which this one is searched")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        if isinstance(data, list):
            return {"type": "categorical", "choices": data}
        if isinstance(data, Mapping) and "type" not in data and "choices" in data:
            data = {"type": "categorical", **data}
        if isinstance(data, Mapping) and isinstance(data.get("when"), Mapping):  # `when: {reducer.name: evict}`
            data = {**data, "when": {k: v if isinstance(v, list) else [v] for k, v in data["when"].items()}}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> SpaceParam:
        for key, allowed in (self.when or {}).items():
            if not allowed:
                raise ValueError(f"when: {key}: list at least one choice")
        if self.type == "categorical":
            if self.low is not None or self.high is not None or self.step is not None or self.log:
                raise ValueError("a categorical takes only 'choices' (no low/high/step/log)")
            if not self.choices:
                raise ValueError("empty choices: list at least one value")
            seen = []
            for c in self.choices:
                if c in seen and type(c) is type(seen[seen.index(c)]):
                    raise ValueError(f"choice {c!r} is listed twice")
                seen.append(c)
            return self
        if self.choices is not None:
            raise ValueError(f"'choices' belongs to a categorical, not to type {self.type}")
        if self.low is None or self.high is None:
            raise ValueError(f"a {self.type} range needs both low and high")
        if self.type == "int":
            for name in ("low", "high", "step"):
                v = getattr(self, name)
                if v is not None and not float(v).is_integer():
                    raise ValueError(f"{name} of an int range must be a whole number, got {v!r}")
        if not self.low < self.high:
            raise ValueError(f"empty range: low ({_num(self.low)}) must be below high ({_num(self.high)})")
        if self.log and self.low <= 0:
            raise ValueError(f"a log range needs low > 0, got {_num(self.low)}")
        if self.log and self.step is not None:
            raise ValueError("step and log cannot be combined (Optuna does not allow it)")
        return self

    # helpers ---------------------------------------------------------------------------------------------------
    def sample_values(self) -> list[Any]:
        """Values that validation resolves the policy with: both ends and the middle, or every choice."""
        if self.type == "categorical":
            return list(self.choices or [])
        assert self.low is not None and self.high is not None
        if self.type == "int":
            lo, hi = int(self.low), int(self.high)
            return list(dict.fromkeys([lo, (lo + hi) // 2, hi]))
        return [float(self.low), float((self.low + self.high) / 2), float(self.high)]

    def reference_value(self) -> Any:
        return self.sample_values()[0]

    def grid_values(self) -> list[Any] | None:
        """The grid of this range for the grid sampler (``None``: continuous, no grid)."""
        if self.type == "categorical":
            return list(self.choices or [])
        assert self.low is not None and self.high is not None
        if self.type == "int":
            step = int(self.step or 1)
            return list(range(int(self.low), int(self.high) + 1, step))
        if self.step is None:
            return None
        n = int(math.floor((self.high - self.low) / self.step + 1e-9))
        return [round(self.low + i * self.step, 12) for i in range(n + 1)]


def _num(x: float | None) -> str:
    if x is None:
        return "None"
    return str(int(x)) if float(x).is_integer() else repr(x)


def expand_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """Search-space values as policy overrides: a key naming several comma-separated paths
    (``encode.recent,decode.recent``) sets each of them to the one value (tied parameters)."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        for path in str(key).split(","):
            if path.strip():
                out[path.strip()] = value
    return out


def check_policy_space(
    policy: Any, space: Mapping[str, SpaceParam], extra: Mapping[str, Any] | None = None
) -> list[ConfigIssue]:
    """Resolve the base policy alone; then, in every branch of the space (each combination of the choices that
    ``when:`` conditions name; a space without conditions is one branch), the policy with the branch's choices, with
    each parameter the branch searches at each of its sample values (others absent), and with all of them at their
    reference values together. Problems are attributed to ``policy`` or ``space.<path>`` and name the branch."""
    extra = dict(extra or {})
    try:
        doc, _ = read_policy_document(policy)
    except PolicyConfigError as exc:
        return [ConfigIssue("policy", str(exc))]
    # a base without a budget is fine when the space sets one
    sets_budget = any(k in ("ratio", "tokens") for k in (*expand_params(dict.fromkeys(space)), *extra))
    base = _resolve_issues(doc, extra, sets_budget)
    if base:
        return [ConfigIssue(f"policy.{i.path}" if i.path else "policy", i.message) for i in base]
    issues = when_issues(space)
    if issues:
        return issues
    every = branches(space)
    if len(every) > MAX_BRANCHES:
        return [ConfigIssue("space", f"the when: conditions make more than {MAX_BRANCHES} branches (combinations of "
                                     "the choices they name); split the search into several sweeps")]
    return _BranchCheck(doc, space, extra, sets_budget).run(every)


def _resolve_issues(doc: Any, overrides: Mapping[str, Any], sets_budget: bool) -> list[ConfigIssue]:
    try:
        resolve_policy(doc, overrides=dict(overrides))
    except PolicyConfigError as exc:
        return [i for i in exc.issues if not (sets_budget and i.path == "ratio" and "no budget" in i.message)]
    return []


def _label(branch: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={show(v)}" for k, v in branch.items())


class _BranchCheck:
    """The per-branch checks of :func:`check_policy_space`: one issue per path (its first failure, the branch named),
    with the ``when:`` clause that would fix it when the path is valid in other branches."""

    def __init__(self, doc: Any, space: Mapping[str, SpaceParam], extra: dict[str, Any], sets_budget: bool):
        self.doc, self.space, self.extra, self.sets_budget = doc, space, extra, sets_budget
        self.failed: dict[str, list[tuple[dict[str, Any], Any, str]]] = {}
        self.valid: dict[str, list[dict[str, Any]]] = {}
        self.checked: dict[str, int] = {}  # branches in which each path was checked

    def error(self, overrides: Mapping[str, Any]) -> str | None:
        found = _resolve_issues(self.doc, {**self.extra, **expand_params(overrides)}, self.sets_budget)
        return "; ".join(str(i) for i in found) if found else None

    def run(self, every: list[dict[str, Any]]) -> list[ConfigIssue]:
        joint: list[ConfigIssue] = []
        for branch in every:
            if branch and self.error(branch) is not None:  # a switch's choice is itself invalid here
                self.blame_switch(branch)
                continue
            active = active_paths(self.space, branch)
            passed = [self.check_path(path, branch) for path in active]  # every path, not only up to the first
            if all(passed) and len(active) + len(branch) > 1:
                ref = {**branch, **{p: self.space[p].reference_value() for p in active}}
                if (msgs := self.error(ref)) is not None:
                    where = f" when {_label(branch)}" if branch else ""
                    joint.append(ConfigIssue("space", f"the parameters together give an invalid policy ({ref})"
                                                      f"{where}: {msgs}"))
        issues = [self.issue(path, fails) for path, fails in self.failed.items()]
        return issues or joint

    def blame_switch(self, branch: dict[str, Any]) -> None:
        """The first switch (in dependency order) whose choice makes the branch invalid, given the switches before it:
        an unknown part name is reported once, not once per combination with the other switches."""
        keys = list(branch)
        for n, key in enumerate(keys, 1):
            if (msgs := self.error({k: branch[k] for k in keys[:n]})) is not None:
                entry = ({k: branch[k] for k in keys[: n - 1]}, branch[key], msgs)
                if entry not in self.failed.get(key, []):
                    self.failed.setdefault(key, []).append(entry)
                return

    def check_path(self, path: str, branch: dict[str, Any]) -> bool:
        self.checked[path] = self.checked.get(path, 0) + 1
        for value in self.space[path].sample_values():
            if (msgs := self.error({**branch, path: value})) is not None:
                self.failed.setdefault(path, []).append((branch, value, msgs))
                return False
        self.valid.setdefault(path, []).append(branch)
        return True

    def issue(self, path: str, fails: list[tuple[dict[str, Any], Any, str]]) -> ConfigIssue:
        branch, value, msgs = fails[0]
        where = f" when {_label(branch)}" if branch else ""
        more = f" (and in {len(fails) - 1} other branch(es))" if len(fails) > 1 else ""
        if len(fails) > 1 and len(fails) == self.checked.get(path):  # invalid whatever the other choices
            where, more = "", ""
        return ConfigIssue(f"space.{path}", f"with value {value!r} the policy is invalid{where}{more}: {msgs}"
                           + self.hint(fails, self.valid.get(path, [])))

    @staticmethod
    def hint(fails: list[tuple[dict[str, Any], Any, str]], ok: list[dict[str, Any]]) -> str:
        """Where the path is valid: the ``when:`` clause that searches it only there."""
        if not ok:
            return ""
        for key in dict.fromkeys(k for b in ok for k in b):
            good = [b[key] for b in ok if key in b]
            if all(key in b and not any(b[key] == g and type(b[key]) is type(g) for g in good) for b, _, _ in fails):
                shown = ", ".join(dict.fromkeys(show(g) for g in good))
                return f"; it applies when {key} is {shown}: add when: {{{key}: [{shown}]}}"
        return "; it applies only when " + " or ".join(_label(b) for b in ok[:4]) + ": give it a when: clause"


def suggest_params(trial: Any, space: Mapping[str, SpaceParam]) -> dict[str, Any]:
    """One value per search path from an Optuna trial (its sampler decides), keyed by the path as written; define-by-
    run: a parameter whose ``when:`` condition fails is not suggested (switches are suggested before it)."""
    params: dict[str, Any] = {}
    for path in order(space):
        p = space[path]
        if not is_active(p, params):
            continue
        if p.type == "float":
            params[path] = trial.suggest_float(path, float(p.low), float(p.high), step=p.step, log=p.log)
        elif p.type == "int":
            params[path] = trial.suggest_int(path, int(p.low), int(p.high), step=int(p.step or 1), log=p.log)
        else:
            params[path] = trial.suggest_categorical(path, list(p.choices or []))
    return params
