"""Resolution: a policy document in, a fully validated :class:`~kvpolicy.config.build.ResolvedPolicy` out (nothing
built yet). One function per step, in the order :func:`resolve_policy` runs them; see :mod:`kvpolicy.config` for
the rules. Every step appends its problems to the draft, so that one :class:`PolicyConfigError` lists them all."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from pydantic import BaseModel, ValidationError

from ..errors import ConfigIssue, did_you_mean, issues_from_validation
from ..hookspecs import PartSpec
from ..params import sinks_params
from ..core.policy import Budget, CachePolicy
from ..registry import Registry, UnknownPartError, get_registry
from .build import ResolvedPart, ResolvedPolicy
from .documents import expand_presets, merge_documents, nest_overrides, part_dict, read_policy_document
from .sinks import SinksResolution, resolve_sinks
from .spec import (
    BUDGET_FIELDS,
    DEFAULT_REDUCER,
    ENGINE_CAPABILITIES,
    ENGINE_QUIRKS,
    KIND_WORDS,
    PART_FIELDS,
    PartRef,
    PolicyConfigError,
    PolicySpec,
)

__all__ = ["load_policy", "preset_problems", "resolve_policy"]

PolicySource = str | Path | Mapping[str, Any] | PolicySpec
#: ``(part field, parameter)`` of a quirk switch; the part field is ``engine`` for the engine's own quirks
QuirkTarget = tuple[str, str]


class FoundPart(NamedTuple):
    """A part named by the document: its spec, the package that contributed it, the parameters written for it."""

    spec: PartSpec
    source: str
    params: dict[str, Any]


@dataclass
class Draft:
    """A policy on its way through resolution: ``top`` is the user's document with its overrides, ``merged`` the
    same laid over its presets; each step adds what it found and appends its problems to ``issues``."""

    top: dict[str, Any]
    merged: dict[str, Any]
    source: str | None
    registry: Registry
    #: quirk names only the presets set (dropped silently when the part they were for was replaced)
    inherited_quirks: set[str]
    issues: list[ConfigIssue] = field(default_factory=list)
    #: top-level fields whose own validation failed: later steps leave them alone
    bad_fields: set[str] = field(default_factory=set)
    found: dict[str, FoundPart] = field(default_factory=dict)
    #: every quirk name the policy's parts (and the engine) declare -> where it switches
    known_quirks: dict[str, list[QuirkTarget]] = field(default_factory=dict)
    quirk_set: dict[QuirkTarget, bool] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------- entry points
def resolve_policy(
    obj: PolicySource, registry: Registry | None = None, overrides: Mapping[str, Any] | None = None
) -> ResolvedPolicy:
    """Validate a policy completely (nothing is built) and return it in explicit form. Raises
    :class:`PolicyConfigError` listing every problem."""
    return _resolve(obj, registry, overrides, require_budget=True)


def load_policy(
    obj: PolicySource, registry: Registry | None = None, overrides: Mapping[str, Any] | None = None
) -> CachePolicy:
    """Validate ``obj`` (file path, preset name, YAML text, mapping or :class:`PolicySpec`), then build its parts.

    ``overrides`` maps dotted paths to values laid over the document (``{"ratio": 0.5, "decode.offset": -10}``)."""
    return resolve_policy(obj, registry, overrides).build()


def preset_problems(registry: Registry | None = None) -> dict[str, str | None]:
    """For each registered preset, ``None`` if it resolves or the error message. A preset without a budget is checked
    with a placeholder one; its quirk names must all be known."""
    registry = registry or get_registry()
    out: dict[str, str | None] = {}
    for name in registry.presets():
        try:
            _resolve({"preset": name}, registry, None, require_budget=False, strict_presets=True)
            out[name] = None
        except PolicyConfigError as exc:
            out[name] = str(exc)
    return out


def _resolve(
    obj: Any,
    registry: Registry | None,
    overrides: Mapping[str, Any] | None,
    require_budget: bool,
    strict_presets: bool = False,
) -> ResolvedPolicy:
    """The steps in order; the first raises on its own (nothing to validate without the layers), the others collect."""
    draft = lay_documents(obj, registry if registry is not None else get_registry(), overrides, strict_presets)
    if not require_budget and not any(draft.merged.get(k) is not None for k in BUDGET_FIELDS):
        draft.merged["ratio"] = 0.5  # placeholder: presets usually leave the budget to the user
    check_fields(draft)
    find_parts(draft)
    set_quirks(draft)
    sinks = resolve_policy_sinks(draft)
    parts = validate_parameters(draft, sinks)
    budget = resolve_budget(draft)
    check_capabilities(draft, parts)
    if draft.issues:
        raise PolicyConfigError(draft.issues, draft.source)
    assert budget is not None
    return explicit_policy(draft, parts, budget, sinks)


# ---------------------------------------------------------------------------------------------------- the steps
def lay_documents(obj: Any, registry: Registry, overrides: Mapping[str, Any] | None, strict_presets: bool) -> Draft:
    """1. Layers: the document, its dotted overrides on top, the whole over its preset chain."""
    doc, source = read_policy_document(obj)
    top = doc
    for layer in nest_overrides(overrides or {}):
        top = merge_documents(top, layer)
    issues: list[ConfigIssue] = []
    merged, inherited = expand_presets(top, registry, issues)
    if issues:
        raise PolicyConfigError(issues, source)
    return Draft(top, merged, source, registry, set() if strict_presets else inherited)


def check_fields(draft: Draft) -> None:
    """2a. The document's own fields, against :class:`PolicySpec`."""
    try:
        PolicySpec.model_validate(draft.merged)
    except ValidationError as exc:
        for issue in issues_from_validation(exc, PolicySpec):
            draft.issues.append(issue)
            draft.bad_fields.add(issue.path.split(".")[0])


def find_parts(draft: Draft) -> None:
    """2b. Part names, against the registry (quirk names depend on which parts are present); the default reducer."""
    registry = draft.registry
    for fname in PART_FIELDS:
        raw = part_dict(draft.merged.get(fname))
        if fname in draft.bad_fields or raw is None:
            continue
        name = raw.get("name")
        if name is None:
            available = ", ".join(registry.names(fname)) or "(none registered)"
            message = f"required: the name of a registered {KIND_WORDS[fname]}; available: {available}"
            draft.issues.append(ConfigIssue(f"{fname}.name", message))
            continue
        try:
            spec, src = registry.part(fname, name)
        except UnknownPartError as exc:
            message = str(exc).replace(f"unknown {fname} ", f"unknown {KIND_WORDS[fname]} ", 1)
            draft.issues.append(ConfigIssue(f"{fname}.name", message))
            continue
        draft.found[fname] = FoundPart(spec, src, {k: v for k, v in raw.items() if k != "name"})
    if "reducer" in draft.found or "reducer" in draft.bad_fields or draft.merged.get("reducer") is not None:
        return
    if registry.has_part("reducer", DEFAULT_REDUCER):
        spec, src = registry.part("reducer", DEFAULT_REDUCER)
        draft.found["reducer"] = FoundPart(spec, src, {})
        return
    draft.issues.append(
        ConfigIssue(
            "reducer",
            f"required: name a reducer (the default, {DEFAULT_REDUCER!r}, is not registered: kvpolicy's "
            f"built-in plugins are not installed); available: "
            f"{', '.join(registry.names('reducer')) or '(none registered)'}",
        )
    )


def set_quirks(draft: Draft) -> None:
    """3. Quirks: which ``quirk_<name>`` switches ``reference_quirks`` turns on (all of them, or those it names)."""
    known = draft.known_quirks
    for fname, found in draft.found.items():
        for pname in found.spec.params.model_fields:
            if pname.startswith("quirk_"):
                known.setdefault(pname[len("quirk_") :], []).append((fname, pname))
    for q in ENGINE_QUIRKS:
        known.setdefault(q, []).append(("engine", q))
    rq = draft.merged.get("reference_quirks", False)
    if "reference_quirks" in draft.bad_fields:
        return
    if rq is True:
        draft.quirk_set = {t: True for targets in known.values() for t in targets}
    elif isinstance(rq, Mapping):
        for key, on in rq.items():
            targets = _quirk_targets(str(key), known)
            if targets is None and str(key) in draft.inherited_quirks:
                continue  # set by the preset for a part the user replaced: not applicable
            if targets is None:
                draft.issues.append(
                    ConfigIssue(
                        f"reference_quirks.{key}",
                        f"unknown quirk {key!r}; known quirks of this policy: {', '.join(sorted(known))}"
                        + did_you_mean(str(key), sorted(known)),
                    )
                )
                continue
            for t in targets:
                draft.quirk_set[t] = bool(on)


def _quirk_targets(key: str, known: dict[str, list[QuirkTarget]]) -> list[QuirkTarget] | None:
    part = None
    if "." in key:
        part, key = key.split(".", 1)
    key = key.removeprefix("quirk_")
    targets = known.get(key)
    if targets is None:
        return None
    if part is not None:
        targets = [t for t in targets if t[0] == part]
        return targets or None
    return targets


def resolve_policy_sinks(draft: Draft) -> SinksResolution:
    """3b. Protected sinks: the policy's ``sinks`` and the part parameters that repeat it become one number (see
    :mod:`kvpolicy.config.sinks`): the user's document (``top``) wins over its presets."""
    marked: dict[tuple[str, str], Any] = {}
    user: dict[tuple[str, str], Any] = {}
    given: dict[tuple[str, str], Any] = {}
    for fname, (spec, _, params) in draft.found.items():
        top_part = part_dict(draft.top.get(fname))
        for p in sinks_params(spec.params):
            marked[fname, p] = spec.params.model_fields[p].default
            if p in params:
                given[fname, p] = params[p]
            if isinstance(top_part, Mapping) and p in top_part:
                user[fname, p] = top_part[p]
    ok = "sinks" not in draft.bad_fields
    top_sinks, merged_sinks = (draft.top.get("sinks"), draft.merged.get("sinks")) if ok else (None, None)
    res = resolve_sinks(top_sinks, merged_sinks, user, given, marked)
    draft.issues.extend(ConfigIssue(path, message) for path, message in res.issues)
    return res


def validate_parameters(draft: Draft, sinks: SinksResolution) -> dict[str, ResolvedPart]:
    """4. Part parameters, against each part's pydantic model (unknown ones rejected); quirks fill the rest."""
    parts: dict[str, ResolvedPart] = {}
    for fname, (spec, src, given) in draft.found.items():
        given = {**given, **{p: v for (f, p), v in sinks.params.items() if f == fname}}
        model = spec.params
        fields = list(model.model_fields)
        unknown = [k for k in given if k not in fields and not _is_alias(model, k)]
        for k in unknown:
            draft.issues.append(
                ConfigIssue(
                    f"{fname}.{k}",
                    f"unknown parameter of {KIND_WORDS[fname]} {spec.name!r} (value {given[k]!r}); "
                    f"parameters: {', '.join(fields) or '(none)'}" + did_you_mean(str(k), fields),
                )
            )
        if unknown:
            continue
        values = {p: on for (f, p), on in draft.quirk_set.items() if f == fname and p not in given}
        values.update(given)
        try:
            params = model.model_validate(values)
        except ValidationError as exc:
            draft.issues.extend(issues_from_validation(exc, model, prefix=fname, what="parameter"))
            continue
        parts[fname] = ResolvedPart(fname, spec, src, params)
    return parts


def _is_alias(model: type[BaseModel], key: str) -> bool:
    return any(f.alias == key or f.validation_alias == key for f in model.model_fields.values())


def resolve_budget(draft: Draft) -> Budget | None:
    """5. The budget: exactly one of ratio and tokens, and a decode rule that fits it."""
    if {"ratio", "tokens", "decode_budget"} & draft.bad_fields:
        return None
    ratio, tokens, mode = draft.merged.get("ratio"), draft.merged.get("tokens"), draft.merged.get("decode_budget")
    if ratio is not None and tokens is not None:
        issue = ConfigIssue(
            "ratio",
            f"both ratio ({ratio!r}) and tokens ({tokens!r}) are set; set exactly "
            "one of ratio (fraction removed, in [0, 1)) or tokens (entries kept, >= 1)",
        )
    elif ratio is None and tokens is None:
        issue = ConfigIssue(
            "ratio",
            "no budget: set ratio (fraction of the cache removed, in [0, 1)) or "
            "tokens (entries kept per layer and kv head, >= 1)",
        )
    elif mode == "fraction" and ratio is None:
        issue = ConfigIssue(
            "decode_budget",
            "'fraction' keeps the cache at (1 - ratio) of the tokens seen and needs a ratio; with tokens use 'fixed' "
            "or 'off'",
        )
    else:
        try:
            return Budget(ratio=ratio, tokens=tokens, decode=mode)
        except ValidationError as exc:
            draft.issues.extend(issues_from_validation(exc, Budget))
            return None
    draft.issues.append(issue)
    return None


def part_requires(spec: PartSpec, part: ResolvedPart | None, scorer: str) -> frozenset[str]:
    """What a part requires of ``scorer``: its spec's tags, plus, of the encode scorer, those its validated parameters
    add (a params model may define ``encode_requires() -> frozenset[str]`` where an option reads more of the prefill
    scores, e.g. a reducer that shares a layer's budget across kv heads needs scores per kv head)."""
    extra = getattr(part.params, "encode_requires", None) if part is not None and scorer == "encode" else None
    return frozenset(spec.requires) | (frozenset(extra()) if callable(extra) else frozenset())


def check_capabilities(draft: Draft, parts: Mapping[str, ResolvedPart]) -> None:
    """6. Capabilities: what a reducer (or allocator) requires, the scorers feeding it (or the engine) provide."""
    found = draft.found
    pairs = [("reducer", s) for s in ("encode", "decode")] + [("allocator", "encode")]
    for consumer, scorer in pairs:
        if consumer not in found or scorer not in found:
            continue
        spec, sspec = found[consumer].spec, found[scorer].spec
        missing = set(part_requires(spec, parts.get(consumer), scorer)) - set(sspec.provides) - ENGINE_CAPABILITIES
        if missing:
            draft.issues.append(
                ConfigIssue(
                    consumer,
                    f"{KIND_WORDS[consumer]} {spec.name!r} requires capability {', '.join(sorted(missing))!s} which "
                    f"the {KIND_WORDS[scorer]} {sspec.name!r} does not provide (it provides: "
                    f"{', '.join(sorted(sspec.provides)) or 'nothing'})",
                )
            )


def explicit_policy(
    draft: Draft, parts: dict[str, ResolvedPart], budget: Budget, sinks: SinksResolution
) -> ResolvedPolicy:
    """The validated policy in explicit form: no preset, every parameter and quirk spelled out."""
    engine = {q: draft.quirk_set.get(("engine", q), False) for q in ENGINE_QUIRKS}
    quirks: dict[str, bool] = {}
    for targets in draft.known_quirks.values():
        for part_field, param in targets:
            if part_field == "engine":
                quirks[param] = engine[param]
            elif part_field in parts:
                quirks[f"{part_field}.{param}"] = bool(getattr(parts[part_field].params, param))
    name = _policy_name(draft.top, draft.source, draft.merged)
    spec = PolicySpec(
        name=name,
        ratio=budget.ratio,
        tokens=budget.tokens,
        decode_budget=None if budget.decode == ("fraction" if budget.ratio is not None else "fixed") else budget.decode,
        reference_quirks={q: True for q, on in engine.items() if on} or False,
        sinks=sinks.sinks,
        **{f: PartRef(name=p.spec.name, **p.params.model_dump(by_alias=True)) for f, p in parts.items()},
    )
    return ResolvedPolicy(name=name, spec=spec, budget=budget, parts=parts, engine_quirks=engine, quirks=quirks)


def _policy_name(top: Mapping[str, Any], source: str | None, merged: Mapping[str, Any]) -> str:
    """The document's own ``name``, else the stem of the file it came from (a tuned policy saved as ``fast.yaml`` is
    ``fast`` in tables, legends and result files, not its preset's name), else the preset's name, else ``custom``."""
    if isinstance(top.get("name"), str) and top["name"]:
        return top["name"]
    if source is not None:
        return Path(source).stem
    return merged.get("name") or "custom"
