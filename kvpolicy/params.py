"""Describing a part's parameters: readable types, ranges and choices read off a pydantic parameter model.

Why a module of its own: the registry (``kvpolicy plugins`` lists every parameter), the policy resolution (an error
names what a parameter allows) and the one translator of pydantic errors (:mod:`kvpolicy.errors`) all describe fields
the same way; none of them should import another to do so.

:data:`POLICY_SINKS` is the marker a part parameter carries when it repeats the policy's protected sinks
(``json_schema_extra={POLICY_SINKS: True}``, e.g. Elastic's ``anchor_merge.start_size``); see
:mod:`kvpolicy.config.sinks` for how resolution fills it.
"""

from __future__ import annotations

import enum
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined, to_jsonable_python

__all__ = [
    "POLICY_SINKS",
    "ParamInfo",
    "field_choices",
    "field_range",
    "is_sinks_param",
    "param_info",
    "sinks_params",
    "type_name",
]

#: ``json_schema_extra`` key marking a part parameter that repeats the policy's protected sinks
POLICY_SINKS = "policy_sinks"


@dataclass(frozen=True)
class ParamInfo:
    """One parameter of a part, as ``kvpolicy plugins`` shows it."""

    name: str
    type: str
    required: bool
    default: Any
    range: str | None
    choices: list[Any] | None
    description: str | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "type": self.type,
            "required": self.required,
            "default": to_jsonable_python(self.default, fallback=repr),
            "range": self.range,
            "choices": to_jsonable_python(self.choices, fallback=repr),
            "description": self.description,
        }

    def brief(self) -> str:
        """``offset: int = -25 [range]``"""
        text = f"{self.name}: {self.type}"
        text += " (required)" if self.required else f" = {self.default!r}"
        if self.range:
            text += f" {self.range}"
        return text


def type_name(annotation: Any) -> str:
    """A readable name for a type annotation: ``int``, ``float | None``, ``'a' | 'b'``, ``dict[str, bool]``."""
    if annotation is None or annotation is type(None):
        return "None"
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        return type_name(args[0])
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in args)
    if origin is typing.Union or origin is types.UnionType:
        return " | ".join(type_name(a) for a in args)
    if origin is not None:
        base = getattr(origin, "__name__", str(origin))
        return f"{base}[{', '.join(type_name(a) for a in args)}]" if args else base
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def _fmt_num(x: Any) -> str:
    if isinstance(x, float) and x.is_integer():
        return str(int(x))
    return str(x)


def field_range(info: FieldInfo) -> str | None:
    """The numeric (or length) constraints of a field as text: ``[0, 1)``, ``>= 1``, ``length <= 8``."""
    lo = hi = None
    lo_closed = hi_closed = True
    min_len = max_len = None
    for m in info.metadata:
        for attr, closed, is_lo in (("ge", True, True), ("gt", False, True), ("le", True, False), ("lt", False, False)):
            value = getattr(m, attr, None)
            if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if is_lo:
                lo, lo_closed = value, closed
            else:
                hi, hi_closed = value, closed
        if getattr(m, "min_length", None) is not None:
            min_len = m.min_length
        if getattr(m, "max_length", None) is not None:
            max_len = m.max_length
    if lo is not None and hi is not None:
        return f"{'[' if lo_closed else '('}{_fmt_num(lo)}, {_fmt_num(hi)}{']' if hi_closed else ')'}"
    if lo is not None:
        return f"{'>=' if lo_closed else '>'} {_fmt_num(lo)}"
    if hi is not None:
        return f"{'<=' if hi_closed else '<'} {_fmt_num(hi)}"
    if min_len is not None or max_len is not None:
        parts = []
        if min_len is not None:
            parts.append(f"length >= {min_len}")
        if max_len is not None:
            parts.append(f"length <= {max_len}")
        return ", ".join(parts)
    return None


def field_choices(annotation: Any) -> list[Any] | None:
    """The allowed values of a ``Literal`` or ``Enum`` annotation (``None`` included for an optional one)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        return field_choices(args[0])
    if origin is typing.Literal:
        return list(args)
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return [m.value for m in annotation]
    if origin is typing.Union or origin is types.UnionType:
        out: list[Any] = []
        for a in args:
            if a is type(None):
                out.append(None)
                continue
            sub = field_choices(a)
            if sub is None:
                return None
            out += sub
        return out
    return None


def param_info(model: type[BaseModel]) -> list[ParamInfo]:
    """Describe every field of a part's parameter model."""
    out = []
    for fname, info in model.model_fields.items():
        required = info.is_required()
        if required:
            default = None
        elif info.default_factory is not None:
            try:
                default = info.default_factory()  # type: ignore[call-arg]
            except Exception:  # noqa: BLE001
                default = "<factory>"
        else:
            default = None if info.default is PydanticUndefined else info.default
        description = info.description
        if description:
            description = description.strip().splitlines()[0]
        out.append(
            ParamInfo(
                name=fname,
                type=type_name(info.annotation),
                required=required,
                default=default,
                range=field_range(info),
                choices=field_choices(info.annotation),
                description=description,
            )
        )
    return out


def is_sinks_param(info: FieldInfo) -> bool:
    """Whether a part parameter is marked as repeating the policy's ``sinks``."""
    extra = info.json_schema_extra
    return isinstance(extra, Mapping) and bool(extra.get(POLICY_SINKS))


def sinks_params(model: type[BaseModel]) -> list[str]:
    """Names of the parameters of ``model`` that repeat the policy's ``sinks``."""
    return [name for name, info in model.model_fields.items() if is_sinks_param(info)]
