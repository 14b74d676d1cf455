"""The search space: ranges of dotted policy paths, their values as policy overrides, and the check that every path
and value gives a valid policy (before anything loads); Optuna suggestions come from here too."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..config import ConfigIssue, PolicyConfigError, read_policy_document, resolve_policy

__all__ = ["SpaceParam", "check_policy_space", "expand_params", "suggest_params"]


class SpaceParam(BaseModel):
    """A search range for one dotted path: ``{type: float, low, high, step?, log?}``, ``{type: int, ...}`` or
    ``{type: categorical, choices: [...]}`` (a bare list is a categorical)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["float", "int", "categorical"] = Field(description="float | int | categorical")
    low: float | None = None
    high: float | None = None
    step: float | None = Field(default=None, gt=0)
    log: bool = False
    choices: list[bool | int | float | str | None] | None = None

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        if isinstance(data, list):
            return {"type": "categorical", "choices": data}
        if isinstance(data, Mapping) and "type" not in data and "choices" in data:
            return {"type": "categorical", **data}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> SpaceParam:
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
    """Resolve the base policy alone, then with each search path at each of its sample values (others absent), then
    with every path at its reference value together. Problems are attributed to ``policy`` or ``space.<path>``."""
    issues: list[ConfigIssue] = []
    extra = dict(extra or {})
    try:
        doc, _ = read_policy_document(policy)
    except PolicyConfigError as exc:
        return [ConfigIssue("policy", str(exc))]
    try:
        resolve_policy(doc, overrides=extra)
    except PolicyConfigError as exc:
        # a base without a budget is fine when the space sets one
        sets_budget = any(k in ("ratio", "tokens") for k in space) or any(k in ("ratio", "tokens") for k in extra)
        real = [i for i in exc.issues if not (sets_budget and i.path == "ratio" and "no budget" in i.message)]
        if real:
            return [ConfigIssue(f"policy.{i.path}" if i.path else "policy", i.message) for i in real]
    bad: set[str] = set()
    for path, param in space.items():
        for value in param.sample_values():
            try:
                resolve_policy(doc, overrides={**extra, **expand_params({path: value})})
            except PolicyConfigError as exc:
                msgs = "; ".join(str(i) for i in exc.issues)
                issues.append(ConfigIssue(f"space.{path}", f"with value {value!r} the policy is invalid: {msgs}"))
                bad.add(path)
                break
    if not bad and len(space) > 1:
        ref = {p: s.reference_value() for p, s in space.items()}
        try:
            resolve_policy(doc, overrides={**extra, **expand_params(ref)})
        except PolicyConfigError as exc:
            msgs = "; ".join(str(i) for i in exc.issues)
            issues.append(ConfigIssue("space", f"the parameters together give an invalid policy ({ref}): {msgs}"))
    return issues




def suggest_params(trial: Any, space: Mapping[str, SpaceParam]) -> dict[str, Any]:
    """One value per search path from an Optuna trial (its sampler decides), keyed by the path as written."""
    params = {}
    for path, p in space.items():
        if p.type == "float":
            params[path] = trial.suggest_float(path, float(p.low), float(p.high), step=p.step, log=p.log)
        elif p.type == "int":
            params[path] = trial.suggest_int(path, int(p.low), int(p.high), step=int(p.step or 1), log=p.log)
        else:
            params[path] = trial.suggest_categorical(path, list(p.choices or []))
    return params
