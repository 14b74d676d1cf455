"""A resolved policy and what becomes of it: :class:`ResolvedPolicy` builds its parts into a
:class:`~kvpolicy.policy.CachePolicy`, and :func:`policy_to_dict` writes it back as a plain, fully explicit document
(no preset, every parameter spelled out) that loads to the same policy."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from ..errors import ConfigIssue
from ..hookspecs import PartSpec
from ..core.policy import Budget, BudgetAllocator, CachePolicy, DecodeScorer, EncodeScorer, Reducer
from .spec import KIND_WORDS, PART_FIELDS, PolicyConfigError, PolicySpec

__all__ = ["ResolvedPart", "ResolvedPolicy", "policy_to_dict"]

_PROTOCOLS: dict[str, type] = {
    "encode": EncodeScorer,
    "decode": DecodeScorer,
    "reducer": Reducer,
    "allocator": BudgetAllocator,
}


@dataclass
class ResolvedPart:
    """A part of a resolved policy: its spec, the package that contributed it and its validated parameters."""

    field: str
    spec: PartSpec
    source: str
    params: BaseModel


@dataclass
class ResolvedPolicy:
    """A fully validated policy, ready to build: ``spec`` is the explicit document (no preset, every parameter set)."""

    name: str
    spec: PolicySpec
    budget: Budget
    parts: dict[str, ResolvedPart] = field(default_factory=dict)
    engine_quirks: dict[str, bool] = field(default_factory=dict)
    #: every quirk available to this policy and whether it is on (``reducer.quirk_shift`` style keys)
    quirks: dict[str, bool] = field(default_factory=dict)

    def build(self) -> CachePolicy:
        """Instantiate the parts and return the :class:`CachePolicy` (its ``spec`` attribute holds :attr:`spec`)."""
        built: dict[str, Any] = {}
        issues = []
        for fname, part in self.parts.items():
            obj, issue = _build_part(fname, part)
            if issue is not None:
                issues.append(issue)
            else:
                built[fname] = obj
        if issues:
            raise PolicyConfigError(issues)
        try:
            policy = self._policy(built)
        except ValueError as exc:  # sinks a part states about itself that differ from the policy's
            raise PolicyConfigError([ConfigIssue("sinks", str(exc))]) from None
        policy.spec = self.spec  # type: ignore[attr-defined]  # provenance, read by policy_to_dict()
        return policy

    def _policy(self, built: dict[str, Any]) -> CachePolicy:
        return CachePolicy(
            reducer=built["reducer"],
            budget=self.budget,
            encode=built.get("encode"),
            decode=built.get("decode"),
            allocator=built.get("allocator"),
            origins={fname: (part.spec.name, part.source) for fname, part in self.parts.items()},
            name=self.name,
            drop_after_attention=self.engine_quirks.get("drop_after_attention", False),
            compressed_positions=self.engine_quirks.get("compressed_positions", False),
            sinks=self.spec.sinks,
        )


def _build_part(fname: str, part: ResolvedPart) -> tuple[Any, ConfigIssue | None]:
    """The part's object from its factory, or the issue naming the part (and its package) that failed."""
    try:
        obj = part.spec.factory(part.params)
    except Exception as exc:  # noqa: BLE001 - report which part failed, whatever the cause
        message = f"building {KIND_WORDS[fname]} {part.spec.name!r} failed: {type(exc).__name__}: {exc}"
        return None, ConfigIssue(fname, message)
    protocol = _PROTOCOLS[fname]
    if not isinstance(obj, protocol):
        return None, ConfigIssue(
            fname,
            f"the factory of {part.spec.name!r} (package {part.source}) returned {type(obj).__name__}, "
            f"which is not a {protocol.__name__}",
        )
    return obj, None


_KEY_ORDER = ("name", "preset", *PART_FIELDS, "ratio", "tokens", "decode_budget", "reference_quirks", "sinks")


def policy_to_dict(spec: PolicySpec | ResolvedPolicy | CachePolicy) -> dict[str, Any]:
    """A plain, YAML-ready document for ``spec``: a :class:`PolicySpec` as written, or — for a
    :class:`ResolvedPolicy` or a :class:`CachePolicy` built by :func:`~kvpolicy.config.load_policy` — the explicit
    resolved policy, which :func:`~kvpolicy.config.load_policy` turns back into the same policy."""
    if isinstance(spec, ResolvedPolicy):
        spec = spec.spec
    elif isinstance(spec, CachePolicy):
        resolved = getattr(spec, "spec", None)
        if not isinstance(resolved, PolicySpec):
            raise TypeError("this CachePolicy was not built by load_policy(): it carries no policy document")
        spec = resolved
    elif not isinstance(spec, PolicySpec):
        raise TypeError(f"expected a PolicySpec, ResolvedPolicy or CachePolicy, got {type(spec).__name__}")
    data = spec.model_dump(mode="json", exclude_unset=False)
    out: dict[str, Any] = {}
    for key in _KEY_ORDER:
        value = data.get(key)
        if value is None or (key == "reference_quirks" and value is False):
            continue
        if key in PART_FIELDS and isinstance(value, dict):
            value = {k: v for k, v in value.items() if not (k == "name" and v is None)}
        out[key] = value
    return out
