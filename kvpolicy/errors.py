"""Input errors a user can act on: one line per problem, naming the field, the value given and what is allowed.

:class:`ConfigIssue` and :class:`ConfigError` are the base every app's input error uses (a policy document, a sweep
file, an evaluation section, a command's options), so that the CLI turns any of them into the same ``error: ...``
lines and exit code 2. :func:`issues_from_validation` is the one translator from a pydantic ``ValidationError`` to
such issues: each model that users write (policies, part parameters, sweeps, ablations, evaluations) reads the same.
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from .params import field_choices, field_range, type_name

__all__ = ["ConfigError", "ConfigIssue", "did_you_mean", "issues_from_validation"]


@dataclass(frozen=True)
class ConfigIssue:
    """One problem in a policy: the dotted field path (``decode.offset``) and what is wrong."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class ConfigError(ValueError):
    """A file or document a user wrote is invalid. ``issues`` lists every problem found; the message names each field
    path, the value given and what is allowed. ``source`` is the file it came from, if any."""

    def _header(self, count: int) -> str:
        where = f"{self.source}: " if self.source else ""
        return f"{where}{count} problems:"

    def __init__(self, issues: list[ConfigIssue] | ConfigIssue | str, source: str | None = None):
        if isinstance(issues, str):
            issues = [ConfigIssue("", issues)]
        elif isinstance(issues, ConfigIssue):
            issues = [issues]
        self.issues: list[ConfigIssue] = list(issues)
        self.source = source
        where = f"{source}: " if source else ""
        if len(self.issues) == 1:
            msg = f"{where}{self.issues[0]}"
        else:
            lines = "\n".join(f"  - {i}" for i in self.issues)
            msg = f"{self._header(len(self.issues))}\n{lines}"
        super().__init__(msg)

    @property
    def paths(self) -> list[str]:
        return [i.path for i in self.issues]


def did_you_mean(name: Any, options: list[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``options``, or nothing."""
    close = difflib.get_close_matches(str(name), options, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


# ------------------------------------------------------------------------------------------- locating an error
#: pydantic's branch tags when the annotation is unknown (a ``dict[str, Any]`` value, a validator's union)
_TAG = re.compile(r"^(str|int|float|bool|none|dict\[.*|list\[.*|tuple\[.*|function-(after|before|wrap|plain)\[.*)$")


@dataclass
class _Located:
    """Where an error points: its path without pydantic's union-branch tags, the field it ends on (if a model field),
    the model whose key it ends on (for unknown fields) and whether it went through a union branch."""

    path: tuple[Any, ...]
    field: FieldInfo | None
    parent: type[BaseModel] | None
    union_branch: bool


def _strip(annotation: Any) -> Any:
    """``Annotated[X, ...]`` -> ``X``; ``X | None`` -> ``X`` (several others stay a union)."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _strip(typing.get_args(annotation)[0])
    if origin is typing.Union or origin is types.UnionType:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return _strip(args[0])
        return typing.Union[tuple(args)]  # noqa: UP007
    return annotation


def _is_union(annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    return origin is typing.Union or origin is types.UnionType


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _branch(union: Any, tag: Any) -> Any:
    """The member of ``union`` that pydantic's loc tag names (``'PartRef'``, ``'dict[str,bool]'``), or ``None``."""
    for arg in typing.get_args(union):
        origin = typing.get_origin(arg)
        if isinstance(arg, type) and arg.__name__ == tag:
            return arg
        if origin is not None and str(tag).startswith(f"{getattr(origin, '__name__', '')}["):
            return arg
    return None


def _step(annotation: Any, key: Any) -> tuple[Any, FieldInfo | None, type[BaseModel] | None]:
    """Follow one loc element: ``(annotation there, model field there, model the key belongs to)``."""
    if _is_model(annotation) and isinstance(key, str):
        finfo = annotation.model_fields.get(key)
        return (finfo.annotation if finfo is not None else None), finfo, annotation
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (list, tuple, set, frozenset) and isinstance(key, int) and args:
        return args[0], None, None
    if origin in (dict, Mapping) and len(args) == 2:
        return args[1], None, None
    return None, None, None


def _locate(model: type[BaseModel] | None, loc: tuple[Any, ...]) -> _Located:
    path: list[Any] = []
    annotation: Any = model
    finfo: FieldInfo | None = None
    parent: type[BaseModel] | None = None
    branch = False
    for key in loc:
        annotation = _strip(annotation) if annotation is not None else None
        if (annotation is not None and _is_union(annotation)) or (annotation is None and _TAG.match(str(key))):
            branch = True
            annotation = _branch(annotation, key) if annotation is not None else None
            continue
        path.append(key)
        annotation, finfo, parent = _step(annotation, key)
    return _Located(tuple(path), finfo, parent, branch)


def _path_text(prefix: str, path: tuple[Any, ...]) -> str:
    """``('objectives', 0, 'metric')`` -> ``objectives[0].metric`` (after ``prefix.``, if any)."""
    out = prefix
    for key in path:
        out += f"[{key}]" if isinstance(key, int) else (f".{key}" if out else str(key))
    return out


# ------------------------------------------------------------------------------------------------- the messages
_RANGE_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal", "too_short", "too_long"}


def _range_from_ctx(ctx: Mapping[str, Any]) -> str | None:
    for key, sym in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
        if key in ctx:
            return f"{sym} {ctx[key]}"
    return None


def _describe_value(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _expected(finfo: FieldInfo) -> str:
    """What a field takes, in words: a model may say how it is written (``input_form``), else its type's name."""
    annotation = _strip(finfo.annotation)
    form = getattr(annotation, "input_form", None)
    return form if isinstance(form, str) else type_name(annotation)


def _unknown_key(value: Any, key: Any, parent: type[BaseModel] | None, what: str) -> str:
    allowed = list(parent.model_fields) if parent is not None else []
    if not allowed:
        return f"unknown {what} (value {value!r})"
    return f"unknown {what} (value {value!r}); allowed {what}s: {', '.join(allowed)}" + did_you_mean(key, allowed)


def _message(errs: list[dict[str, Any]], where: _Located, what: str) -> str:
    kinds = {e["type"] for e in errs}
    e0 = errs[0]
    value = e0.get("input")
    finfo = where.field
    expected = _expected(finfo) if finfo is not None else None
    if "extra_forbidden" in kinds:
        return _unknown_key(value, where.path[-1] if where.path else "", where.parent, what)
    if "missing" in kinds:
        return f"required{f' ({expected})' if expected else ''}"
    if kinds & {"too_short", "too_long"} and isinstance(value, (list, dict)):
        return "must not be empty" if "too_short" in kinds else f"too many entries ({e0['msg']})"
    if kinds & _RANGE_ERRORS:
        rng = (field_range(finfo) if finfo is not None else None) or _range_from_ctx(e0.get("ctx", {}))
        about = f" — {finfo.description}" if finfo is not None and finfo.description else ""
        return f"{value!r} is out of range; allowed range: {rng or e0['msg']}{about}"
    if "string_pattern_mismatch" in kinds:
        about = f" ({finfo.description})" if finfo is not None and finfo.description else ""
        return f"{value!r} is not allowed: it must match {e0.get('ctx', {}).get('pattern')}{about}"
    choices = field_choices(finfo.annotation) if finfo is not None else None
    if "literal_error" in kinds or "enum" in kinds or (choices and len(errs) == 1 and not where.union_branch):
        allowed = choices if choices is not None else e0.get("ctx", {}).get("expected")
        listed = ", ".join(repr(c) for c in allowed if c is not None) if isinstance(allowed, list) else allowed
        return f"{value!r} is not allowed; allowed values: {listed}"
    if kinds <= {"value_error", "assertion_error"}:
        msg = re.sub(r"^(Value|Assertion) error, ", "", e0["msg"])
        return f"{msg} (got {value!r})" if finfo is not None and repr(value) not in msg else msg
    if expected is not None:
        return f"expected {expected}, got {_describe_value(value)}"
    return f"{e0['msg'][:1].lower()}{e0['msg'][1:]}, got {_describe_value(value)}"


def issues_from_validation(
    err: ValidationError, model: type[BaseModel] | None = None, prefix: str = "", what: str = "field"
) -> list[ConfigIssue]:
    """Turn a pydantic ``ValidationError`` raised by ``model`` into :class:`ConfigIssue` lines: dotted path
    (``objectives[0].metric``, after ``prefix.``), the value and what the field allows (type, range or choices,
    taken from the field's constraints; an unknown key lists the allowed ones). ``what`` names the keys
    (``field``, ``parameter``). Without ``model`` the paths and pydantic's own messages are used."""
    groups: dict[tuple[Any, ...], list[tuple[_Located, dict[str, Any]]]] = {}
    for e in err.errors(include_url=False):
        where = _locate(model, tuple(e["loc"]))
        groups.setdefault(where.path, []).append((where, e))
    # a union field: keep the branch that got furthest (its errors are deeper), or report the field once
    for path in [p for p, found in groups.items() if any(w.union_branch for w, _ in found)]:
        if any(len(other) > len(path) and other[: len(path)] == path for other in groups):
            del groups[path]
    issues = []
    for path, found in groups.items():
        where = found[0][0]
        where.union_branch = any(w.union_branch for w, _ in found)
        issues.append(ConfigIssue(_path_text(prefix, path), _message([e for _, e in found], where, what)))
    return issues
