"""The policy's protected sinks, stated once: how a policy document's ``sinks`` and the part parameters that repeat it
(e.g. Elastic's ``anchor_merge.start_size``) become one number.

Why: a decode scorer has to know which first tokens the reducer protected, or it may evict them (Elastic Cache's
frozen drop index fell onto the BOS sink for short prompts). :attr:`kvpolicy.core.policy.CachePolicy.sinks` is that number
and every part reads it as ``view.sinks``. A part parameter that means the same thing marks itself with
``json_schema_extra={POLICY_SINKS: True}`` (:data:`kvpolicy.params.POLICY_SINKS`); resolution
(:func:`resolve_sinks`) then fills it from the policy's ``sinks`` or checks it against it, so the two can never
disagree.

Precedence, so that both ``{preset: elastic, sinks: 4}`` and ``{preset: elastic, reducer: {start_size: 4}}`` work:
what the user's own document (overrides included) says wins over what its presets say; within one of them, ``sinks``
and the marked parameters must agree.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["SinksResolution", "resolve_sinks"]

Key = tuple[str, str]  # (part field, parameter name)


@dataclass
class SinksResolution:
    """The policy's sinks (``None``: nothing states them; the built policy derives them from its parts), the value
    each marked part parameter must take, and the problems found as ``(field path, message)``."""

    sinks: int | None
    params: dict[Key, int] = field(default_factory=dict)
    issues: list[tuple[str, str]] = field(default_factory=list)


def resolve_sinks(
    user_sinks: Any,
    preset_sinks: Any,
    user_params: Mapping[Key, Any],
    merged_params: Mapping[Key, Any],
    marked: Mapping[Key, Any],
) -> SinksResolution:
    """One number for the policy's sinks.

    ``user_sinks``: ``sinks`` in the user's document (``None`` if absent); ``preset_sinks``: in the merged document
    (user over presets); ``user_params``/``merged_params``: the marked parameters given in each; ``marked``: every
    marked parameter of the policy's parts with its default."""
    res = SinksResolution(sinks=None)
    if user_sinks is not None:
        source, sinks, bound = "sinks", user_sinks, user_params
    elif user_params:
        source, sinks, bound = _agreeing(user_params, res)
    elif preset_sinks is not None:
        source, sinks, bound = "sinks", preset_sinks, merged_params
    elif marked:
        source, sinks, bound = _agreeing({k: merged_params.get(k, d) for k, d in marked.items()}, res)
    else:
        return res
    if res.issues or isinstance(sinks, bool) or not isinstance(sinks, int):
        return SinksResolution(None, issues=res.issues)  # a non-int is reported by the field's own validation
    for key, value in bound.items():
        if value != sinks and source == "sinks":
            path = ".".join(key)
            res.issues.append(
                (
                    path,
                    f"{value!r} differs from the policy's sinks ({sinks!r}); the number of protected sinks is stated "
                    f"once: leave {path} out or set it to {sinks!r}",
                )
            )
    res.sinks = sinks
    res.params = {key: sinks for key in marked}
    return res


def _agreeing(values: Mapping[Key, Any], res: SinksResolution) -> tuple[str, Any, Mapping[Key, Any]]:
    """The single value the marked parameters give; an issue when they differ."""
    distinct = sorted({repr(v) for v in values.values()})
    first = next(iter(values))
    if len(distinct) > 1:
        given = ", ".join(f"{'.'.join(k)}={v!r}" for k, v in values.items())
        res.issues.append(
            (
                ".".join(first),
                f"the parts' sinks differ ({given}); state the number of protected sinks once with "
                f"sinks: N (an int >= 0)",
            )
        )
    return "params", values[first], values
