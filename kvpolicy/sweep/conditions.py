"""Conditional search spaces: a parameter that exists only for some choices of a categorical (``when:``).

A policy search often chooses a part (``reducer.name: [evict, anchor_merge]``) whose parameters exist only on that
part (``reducer.assign`` is an ``anchor_merge`` parameter). Such a parameter carries a condition::

    reducer.name: [evict, anchor_merge, cam]
    reducer.assign: {choices: [position, cosine], when: {reducer.name: anchor_merge}}
    reducer.probability: {choices: [attention, uniform], when: {reducer.name: [cam]}}

``when`` maps categorical parameters of the same space (the *switches*) to the choice, or list of choices, for which
the parameter is searched; several entries must all hold. A switch may itself carry a condition (nested choices).
Trials are built define-by-run, as Optuna intends (:func:`kvpolicy.sweep.space.suggest_params`): parameters are
suggested in dependency order and one whose condition fails is never suggested, so it is absent from the trial's
parameters and the policy keeps its part's default.

A *branch* is one combination of switch values a trial can take; validation resolves the policy in every branch
(:func:`kvpolicy.sweep.space.check_policy_space`), and each trial records the branch it took (:func:`branch_label`).
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

from ..config import ConfigIssue
from ..registry import KINDS

__all__ = ["MAX_BRANCHES", "active_paths", "branch_label", "branches", "choice_paths", "holds", "is_active",
           "order", "show", "switches", "when_issues"]

#: validation resolves the policy in every branch: more combinations than this is a space nobody can search anyway
MAX_BRANCHES = 512


def holds(value: Any, allowed: list[Any]) -> bool:
    """``value`` is one of ``allowed``, compared with its type (``True`` is not the choice ``1``)."""
    return any(value == a and type(value) is type(a) for a in allowed)


def show(value: Any) -> str:
    """A choice as a branch label writes it: strings bare, others as YAML would (``true``, ``null``, ``0.5``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return "null" if value is None else str(value)


def is_active(param: Any, values: Mapping[str, Any]) -> bool:
    """Whether ``param`` (a :class:`~kvpolicy.sweep.space.SpaceParam`) is searched given the switch ``values``."""
    return all(key in values and holds(values[key], allowed) for key, allowed in (param.when or {}).items())


def switches(space: Mapping[str, Any]) -> list[str]:
    """The parameters some condition names, in the space's order."""
    named = {key for p in space.values() for key in (p.when or {})}
    return [path for path in space if path in named]


def order(space: Mapping[str, Any]) -> list[str]:
    """The space's paths with every switch before the parameters that depend on it (otherwise the file's order).
    Raises ``ValueError`` naming a cycle."""
    done: list[str] = []
    pending = list(space)
    while pending:
        ready = [p for p in pending if all(k in done or k not in space for k in (space[p].when or {}))]
        if not ready:
            raise ValueError(" -> ".join(_cycle(space, pending)))
        done.append(ready[0])
        pending.remove(ready[0])
    return done


def _cycle(space: Mapping[str, Any], pending: list[str]) -> list[str]:
    path, seen = pending[0], []
    while path not in seen:
        seen.append(path)
        path = next(k for k in (space[path].when or {}) if k in pending)
    return seen[seen.index(path):] + [path]


def when_issues(space: Mapping[str, Any]) -> list[ConfigIssue]:
    """Conditions that name no categorical of the space, or a value that is not one of its choices, or a cycle."""
    issues: list[ConfigIssue] = []
    categoricals = [p for p, s in space.items() if s.type == "categorical"]
    for path, param in space.items():
        for key, allowed in (param.when or {}).items():
            where = f"space.{path}.when"
            if key == path:
                issues.append(ConfigIssue(where, f"{path!r} cannot be a condition of itself"))
            elif key not in space:
                close = difflib.get_close_matches(key, categoricals, n=1)
                issues.append(ConfigIssue(where, f"{key!r} is not a parameter of the space; a condition names a "
                                                 f"categorical parameter: {', '.join(categoricals) or '(none)'}"
                                          + (f" (did you mean {close[0]!r}?)" if close else "")))
            elif space[key].type != "categorical":
                issues.append(ConfigIssue(where, f"{key!r} is a {space[key].type} range; a condition names a "
                                                 f"categorical parameter: {', '.join(categoricals) or '(none)'}"))
            else:
                choices = list(space[key].choices or [])
                for value in allowed:
                    if not holds(value, choices):
                        issues.append(ConfigIssue(f"{where}.{key}", f"{value!r} is not a choice of {key}; choices: "
                                                                    f"{', '.join(show(c) for c in choices)}"))
    if not issues:
        try:
            order(space)
        except ValueError as exc:
            issues.append(ConfigIssue("space", f"the when: conditions form a cycle ({exc}); a parameter cannot "
                                               "depend on itself through others"))
    return issues


def branches(space: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every combination of switch values a trial can take (``[{}]`` for a space without conditions). A switch whose
    own condition fails in a combination is absent from it, as it is from such a trial."""
    named = set(switches(space))
    out: list[dict[str, Any]] = [{}]
    for path in order(space):
        if path not in named:
            continue
        grown: list[dict[str, Any]] = []
        for b in out:
            if is_active(space[path], b):
                grown.extend({**b, path: c} for c in space[path].choices or [])
            else:
                grown.append(b)
        out = grown
        if len(out) > MAX_BRANCHES:
            break
    return out


def active_paths(space: Mapping[str, Any], branch: Mapping[str, Any]) -> list[str]:
    """The parameters other than switches that a trial of ``branch`` searches, in dependency order."""
    named = set(switches(space))
    return [p for p in order(space) if p not in named and is_active(space[p], branch)]


def choice_paths(space: Mapping[str, Any]) -> list[str]:
    """The categoricals that choose between branches or parts: the switches, and any categorical that sets a part's
    name (``encode.name``, ``reducer``)."""
    named = set(switches(space))

    def names_a_part(path: str) -> bool:
        return any(seg.strip().split(".")[-1] == "name" or seg.strip() in KINDS for seg in path.split(","))

    return [p for p, s in space.items() if s.type == "categorical" and (p in named or names_a_part(p))]


def branch_label(params: Mapping[str, Any], space: Mapping[str, Any]) -> str | None:
    """Which choices a trial took (``reducer.name=anchor_merge``): the values of its :func:`choice_paths`;
    ``None`` for a space that chooses no part."""
    shown = [f"{p}={show(params[p])}" for p in choice_paths(space) if p in params]
    return ", ".join(shown) or None
