"""Policies as users write them: pydantic models, validation with precise messages, presets, quirks.

A policy document (YAML or a dict) names its parts and budget::

    name: fast_elastic         # optional label for reports (default: the file's stem, else the preset's name)
    preset: elastic            # optional: start from a registered preset
    encode: {name: frequency, per_head: true}
    decode: {name: distance_offset, offset: -25}
    reducer: anchor_merge      # a bare name is the same as {name: anchor_merge}
    ratio: 0.2                 # or tokens: 256 (exactly one)
    decode_budget: fraction    # fraction | fixed | off (default: fraction for a ratio, fixed for tokens)
    reference_quirks: true     # or {ranking: true, drop_after_attention: true}
    evaluation: {model: smollm2-135m, task: continuation, samples: 8}   # optional: how it was measured (read by
                               # `kvpolicy run`, ignored by the policy; a sweep's best_policy.yaml carries one)

Resolution, in order (:func:`resolve_policy`):

1. **Layers.** The user's document, then each dotted ``overrides`` entry (``{"encode.per_head": True}``, what a sweep
   sets) on top of it; then the whole result on top of the preset's document (presets may themselves name a preset).
   Merging one layer onto another: a field set in the upper layer wins; a part written with the *same* name (or with no
   name) keeps the lower layer's parameters and overrides only those it sets (deep merge); a part with a *different*
   name replaces the lower one wholesale; ``null`` removes a part; setting ``ratio`` or ``tokens`` replaces the lower
   layer's budget (both fields); ``reference_quirks`` mappings merge key by key.
2. **Validation** of every field, every part name (against the registry), every part parameter (against the part's
   pydantic model, unknown parameters rejected), the budget, the quirk names and the capability tags
   (a reducer's ``requires`` must be covered by each present scorer's ``provides``). All problems are collected and
   raised as one :class:`PolicyConfigError` whose lines read ``field.path: what is wrong; what is allowed``.
3. **Quirks.** A part's parameter model may declare ``quirk_<name>: bool`` fields (reproductions of the original code's
   behaviour). ``reference_quirks: true`` turns on every quirk of every part in the policy plus the engine quirks
   ``drop_after_attention`` and ``compressed_positions`` (fields of :class:`~kvpolicy.policy.CachePolicy`); a mapping
   sets only the quirks it names (``ranking`` targets every part declaring ``quirk_ranking``; ``encode.ranking`` only
   the encode scorer). A quirk parameter written explicitly on a part always wins over ``reference_quirks``. A quirk
   name is an error unless some part of the final policy declares it — except a name inherited from a preset whose
   part the user replaced, which is dropped silently (presets themselves are checked strictly by
   :func:`preset_problems`, which ``kvpolicy plugins`` shows).
4. **Defaults.** ``reducer`` defaults to the registered part ``evict`` (an error when none is registered). No
   ``encode`` scorer means no prefill compression; no ``decode`` scorer means no decode-stage drops.

Only then are parts built (:func:`load_policy`), each by its ``PartSpec.factory(validated_params)``.
:func:`policy_to_dict` writes a resolved policy back as a plain, fully explicit document (no preset, every parameter
spelled out) that loads to the same policy.
"""

from __future__ import annotations

import copy
import difflib
import re
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.fields import FieldInfo

from .hookspecs import PartSpec
from .policy import Budget, BudgetAllocator, CachePolicy, DecodeScorer, EncodeScorer, Reducer
from .registry import KINDS, Registry, UnknownPartError, field_choices, field_range, get_registry, type_name
from .sinks import SinksResolution, resolve_sinks, sinks_params

__all__ = [
    "BUDGET_FIELDS",
    "ENGINE_CAPABILITIES",
    "ENGINE_QUIRKS",
    "PART_FIELDS",
    "ConfigIssue",
    "PartRef",
    "PolicyConfigError",
    "PolicySpec",
    "ResolvedPart",
    "ResolvedPolicy",
    "load_policy",
    "merge_documents",
    "nest_overrides",
    "policy_to_dict",
    "preset_problems",
    "read_policy_document",
    "resolve_policy",
]

PART_FIELDS: tuple[str, ...] = KINDS
BUDGET_FIELDS: tuple[str, ...] = ("ratio", "tokens")
#: quirks implemented by the engine itself (fields of CachePolicy), switchable by ``reference_quirks``
ENGINE_QUIRKS: dict[str, str] = {
    "drop_after_attention": "decode drops run after the step's attention (the authors' order)",
    "compressed_positions": "new tokens' RoPE positions count from the compressed cache length",
}
#: capability tags the engine itself supplies to every part (LayerView.token_types is always filled)
ENGINE_CAPABILITIES: frozenset[str] = frozenset({"token_types"})
#: the reducer used when a policy names none
DEFAULT_REDUCER = "evict"
_PROTOCOLS: dict[str, type] = {
    "encode": EncodeScorer,
    "decode": DecodeScorer,
    "reducer": Reducer,
    "allocator": BudgetAllocator,
}
_KIND_WORDS = {"encode": "encode scorer", "decode": "decode scorer", "reducer": "reducer", "allocator": "allocator"}


# --------------------------------------------------------------------------------------------------------- errors
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


class PolicyConfigError(ConfigError):
    """A policy document is invalid."""

    def _header(self, count: int) -> str:
        return f"invalid policy{' ' + self.source if self.source else ''} ({count} problems):"


# --------------------------------------------------------------------------------------------------------- models
class PartRef(BaseModel):
    """A part as a policy names it: ``name`` plus the part's parameters as extra fields.

    A bare string is accepted for a part with default parameters (``reducer: evict``). ``name`` may be left out
    only when a preset (or a lower layer) supplies it."""

    model_config = ConfigDict(extra="allow")

    name: str | None = Field(default=None, description="a registered part of this kind")

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, data: Any) -> Any:
        if isinstance(data, str):
            return {"name": data}
        return data

    @property
    def params(self) -> dict[str, Any]:
        """The parameters written for the part (everything but ``name``)."""
        return dict(self.model_extra or {})


class PolicySpec(BaseModel):
    """Everything a user writes about a policy (see the module docstring for how the fields combine)."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(
        default=None,
        description="a label for tables, legends and result files (default: the file's stem, else the preset's name)",
    )
    preset: str | None = Field(default=None, description="a registered preset to start from")
    encode: PartRef | None = Field(default=None, description="encode scorer (prefill); none: no prefill compression")
    decode: PartRef | None = Field(default=None, description="decode scorer; none: no decode-stage drops")
    reducer: PartRef | None = Field(default=None, description=f"reducer (default: {DEFAULT_REDUCER!r})")
    allocator: PartRef | None = Field(default=None, description="per-layer budget allocator")
    ratio: float | None = Field(default=None, ge=0.0, lt=1.0, description="fraction of the cache removed")
    tokens: int | None = Field(default=None, ge=1, description="entries kept per layer and kv head")
    decode_budget: Literal["fraction", "fixed", "off"] | None = Field(
        default=None, description="decode-stage rule (default: fraction for a ratio, fixed for tokens)"
    )
    reference_quirks: bool | dict[str, bool] = Field(
        default=False, description="reproduce the original code's behaviour: true (all quirks) or {quirk: bool}"
    )
    sinks: int | None = Field(
        default=None,
        ge=0,
        le=1 << 20,
        description="protected sinks: the first real tokens of each row that no part drops or merges away (default: "
        "what the parts state, e.g. anchor_merge.start_size; 0 if none does)",
    )
    evaluation: dict[str, Any] | None = Field(
        default=None,
        description="how this policy was measured (model, task, samples, seed, batch_size, dtype, ...), so that "
        "`kvpolicy run --policy <file>` repeats the measurement; not part of the policy itself",
    )


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
            try:
                obj = part.spec.factory(part.params)
            except Exception as exc:  # noqa: BLE001 - report which part failed, whatever the cause
                issues.append(
                    ConfigIssue(
                        fname, f"building {_KIND_WORDS[fname]} {part.spec.name!r} failed: {type(exc).__name__}: {exc}"
                    )
                )
                continue
            protocol = _PROTOCOLS[fname]
            if not isinstance(obj, protocol):
                issues.append(
                    ConfigIssue(
                        fname,
                        f"the factory of {part.spec.name!r} (package {part.source}) returned {type(obj).__name__}, "
                        f"which is not a {protocol.__name__}",
                    )
                )
                continue
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


# ---------------------------------------------------------------------------------------------------- documents
def _part_dict(value: Any) -> Any:
    """A part reference as a dict (``'evict'`` -> ``{'name': 'evict'}``); anything else unchanged."""
    if isinstance(value, str):
        return {"name": value}
    if isinstance(value, PartRef):
        return value.model_dump(exclude_unset=True)
    if isinstance(value, Mapping):
        return dict(value)
    return value


def _deep_merge(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def merge_documents(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """Lay the policy document ``top`` over ``base`` (see the module docstring for the rules)."""
    out = copy.deepcopy(dict(base))
    if any(k in top for k in BUDGET_FIELDS):
        for k in BUDGET_FIELDS:
            out.pop(k, None)
    for key, value in top.items():
        if key in PART_FIELDS and value is not None and out.get(key) is not None:
            lower, upper = _part_dict(out[key]), _part_dict(value)
            if isinstance(lower, dict) and isinstance(upper, dict) and upper.get("name") in (None, lower.get("name")):
                out[key] = _deep_merge(lower, upper)
            else:
                out[key] = copy.deepcopy(upper)
        elif key in PART_FIELDS:
            out[key] = copy.deepcopy(_part_dict(value))
        elif key == "reference_quirks" and isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = {**out[key], **value}
        else:
            out[key] = copy.deepcopy(value)
    return out


def nest_overrides(overrides: Mapping[str, Any]) -> list[dict[str, Any]]:
    """``{"encode.per_head": True, "ratio": 0.3}`` -> one nested document per entry, in order."""
    layers = []
    for path, value in overrides.items():
        keys = [k for k in str(path).split(".") if k]
        if not keys:
            raise PolicyConfigError(ConfigIssue(str(path), "empty override path"))
        doc: Any = value
        for k in reversed(keys):
            doc = {k: doc}
        layers.append(doc)
    return layers


def read_policy_document(obj: str | Path | Mapping[str, Any] | PolicySpec) -> tuple[dict[str, Any], str | None]:
    """The raw policy document of ``obj`` and the file it came from (``None`` if not a file).

    ``obj`` is a :class:`PolicySpec`, a mapping, a :class:`~pathlib.Path`, or a string: the path of an existing
    file (or a string ending in ``.yaml``/``.yml``/``.json``), a bare identifier (taken as a preset name:
    ``"elastic"`` == ``{"preset": "elastic"}``) or YAML text."""
    if isinstance(obj, PolicySpec):
        return obj.model_dump(exclude_unset=True), None
    if isinstance(obj, Mapping):
        return copy.deepcopy(dict(obj)), None
    if isinstance(obj, str):
        text = obj.strip()
        if not _names_a_file(obj):
            if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_\-]*", text):
                return {"preset": text}, None
            return _parse_yaml(obj, None), None
        obj = Path(obj)
    if isinstance(obj, Path):
        try:
            text = obj.read_text(encoding="utf-8")
        except OSError as exc:
            raise PolicyConfigError(f"cannot read policy file {str(obj)!r}: {exc.strerror or exc}") from None
        return _parse_yaml(text, str(obj)), str(obj)
    raise PolicyConfigError(
        f"a policy must be a file path, a preset name, YAML text, a mapping or a PolicySpec, got {type(obj).__name__}"
    )


def _names_a_file(text: str) -> bool:
    if "\n" in text or len(text) > 4096:
        return False
    if text.strip().lower().endswith((".yaml", ".yml", ".json")):
        return True
    try:
        return Path(text).is_file()
    except (OSError, ValueError):
        return False


def _parse_yaml(text: str, source: str | None) -> dict[str, Any]:
    where = source or "<policy>"
    try:
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        loc = f"{where}:{mark.line + 1}:{mark.column + 1}" if mark is not None else where
        what = exc.problem or "invalid YAML"
        if exc.context:
            what += f" ({exc.context})"
        raise PolicyConfigError(f"{loc}: YAML syntax error (line {mark.line + 1 if mark else '?'}): {what}") from None
    except yaml.YAMLError as exc:
        raise PolicyConfigError(f"{where}: YAML error: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise PolicyConfigError(
            f"{where}: a policy document must be a mapping of fields ({', '.join(PolicySpec.model_fields)}), "
            f"got {type(data).__name__}"
        )
    return data


def _expand_presets(
    doc: dict[str, Any], registry: Registry, issues: list[ConfigIssue]
) -> tuple[dict[str, Any], set[str]]:
    """The document laid over its preset chain, and the quirk names that only the presets (not ``doc``) set."""
    seen: list[str] = []
    layers = [doc]
    current = doc
    while current.get("preset") is not None:
        name = current["preset"]
        if not isinstance(name, str):
            issues.append(ConfigIssue("preset", f"expected a preset name (str), got {name!r}"))
            return doc, set()
        if name in seen:
            issues.append(
                ConfigIssue("preset", f"presets refer to each other in a cycle: {' -> '.join(seen + [name])}")
            )
            return doc, set()
        seen.append(name)
        try:
            preset = registry.preset(name).spec
        except UnknownPartError as exc:
            issues.append(ConfigIssue("preset", str(exc)))
            return doc, set()
        current = {"name": name, **copy.deepcopy(preset.policy)}
        layers.append(current)
    out: dict[str, Any] = {}
    for layer in reversed(layers):
        out = merge_documents(out, layer)
    out.pop("preset", None)
    inherited = {
        str(k)
        for layer in layers[1:]
        if isinstance(layer.get("reference_quirks"), Mapping)
        for k in layer["reference_quirks"]
    }
    if isinstance(doc.get("reference_quirks"), Mapping):
        inherited -= {str(k) for k in doc["reference_quirks"]}
    return out, inherited


# ------------------------------------------------------------------------------------------ validation messages
def _is_union(annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _is_union(typing.get_args(annotation)[0])
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        return len([a for a in typing.get_args(annotation) if a is not type(None)]) > 1
    return False


_RANGE_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal", "too_short", "too_long"}


def _range_from_ctx(ctx: Mapping[str, Any]) -> str | None:
    for key, sym in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
        if key in ctx:
            return f"{sym} {ctx[key]}"
    return None


def _describe_value(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def issues_from_validation(
    err: ValidationError, model: type[BaseModel], prefix: str = "", what: str = "field"
) -> list[ConfigIssue]:
    """Turn a pydantic ``ValidationError`` raised by ``model`` into :class:`ConfigIssue` lines: dotted path, the value
    and what the field allows (type, range or choices, taken from the field's constraints)."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for e in err.errors(include_url=False):
        loc = tuple(e["loc"])
        top = model.model_fields.get(loc[0]) if loc and isinstance(loc[0], str) else None
        if top is not None and len(loc) > 1 and _is_union(top.annotation):
            e = dict(e, union_branch=loc[1])  # the union branch tag is not part of the path
            loc = (loc[0],) + loc[2:]
        groups.setdefault(loc, []).append(e)
    # a union field: keep the branch that got furthest (its errors are deeper), or report the field once
    for fname in {loc[0] for loc in groups if loc}:
        deep = [loc for loc in groups if len(loc) > 1 and loc[0] == fname]
        if deep and (fname,) in groups and any("union_branch" in e for e in groups[(fname,)]):
            del groups[(fname,)]
    issues = []
    allowed_fields = ", ".join(model.model_fields)
    for loc, errs in groups.items():
        path = ".".join(([prefix] if prefix else []) + [str(x) for x in loc])
        finfo = _field_at(model, loc)
        issues.append(ConfigIssue(path, _message(errs, finfo, allowed_fields, what)))
    return issues


def _strip_none(annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _strip_none(typing.get_args(annotation)[0])
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
        return typing.Union[tuple(args)]  # noqa: UP007
    return annotation


def _field_at(model: type[BaseModel], loc: tuple) -> FieldInfo | None:
    """The field a loc points to, following nested pydantic models (``('encode', 'name')`` -> ``PartRef.name``)."""
    current: Any = model
    finfo = None
    for i, key in enumerate(loc):
        if not (isinstance(current, type) and issubclass(current, BaseModel) and isinstance(key, str)):
            return None
        finfo = current.model_fields.get(key)
        if finfo is None:
            return None
        if i < len(loc) - 1:
            current = _strip_none(finfo.annotation)
    return finfo


def _expected(finfo: FieldInfo) -> str:
    ann = _strip_none(finfo.annotation)
    if ann is PartRef:
        return "a part name or a mapping {name: <part>, <parameter>: <value>, ...}"
    return type_name(ann)


def _message(errs: list[dict[str, Any]], finfo: FieldInfo | None, allowed_fields: str, what: str) -> str:
    kinds = {e["type"] for e in errs}
    e0 = errs[0]
    value = e0.get("input")
    expected = _expected(finfo) if finfo is not None else None
    if "extra_forbidden" in kinds:
        return f"unknown {what} (value {value!r}); allowed {what}s: {allowed_fields}"
    if "missing" in kinds:
        return f"required{f' ({expected})' if expected else ''}"
    if kinds & _RANGE_ERRORS:
        rng = (field_range(finfo) if finfo is not None else None) or _range_from_ctx(e0.get("ctx", {}))
        about = f" — {finfo.description}" if finfo is not None and finfo.description else ""
        return f"{value!r} is out of range; allowed range: {rng or e0['msg']}{about}"
    choices = field_choices(finfo.annotation) if finfo is not None else None
    if "literal_error" in kinds or "enum" in kinds or (choices and len(errs) == 1 and "union_branch" not in e0):
        allowed = choices if choices is not None else e0.get("ctx", {}).get("expected")
        if isinstance(allowed, list):
            listed = ", ".join(repr(c) for c in allowed if c is not None)
        else:
            listed = allowed
        return f"{value!r} is not allowed; allowed values: {listed}"
    if kinds <= {"value_error", "assertion_error"}:
        msg = re.sub(r"^(Value|Assertion) error, ", "", e0["msg"])
        return f"{msg} (got {value!r})" if finfo is not None else msg
    if expected is not None:
        return f"expected {expected}, got {_describe_value(value)}"
    return f"{e0['msg'][:1].lower()}{e0['msg'][1:]}, got {_describe_value(value)}"


def _did_you_mean(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


# -------------------------------------------------------------------------------------------------- resolution
def resolve_policy(
    obj: str | Path | Mapping[str, Any] | PolicySpec,
    registry: Registry | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> ResolvedPolicy:
    """Validate a policy completely (nothing is built) and return it in explicit form. Raises
    :class:`PolicyConfigError` listing every problem."""
    return _resolve(obj, registry, overrides, require_budget=True)


def load_policy(
    obj: str | Path | Mapping[str, Any] | PolicySpec,
    registry: Registry | None = None,
    overrides: Mapping[str, Any] | None = None,
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
    registry = registry if registry is not None else get_registry()
    doc, source = read_policy_document(obj)
    issues: list[ConfigIssue] = []

    top = doc
    for layer in nest_overrides(overrides or {}):
        top = merge_documents(top, layer)
    merged, inherited_quirks = _expand_presets(top, registry, issues)
    if strict_presets:
        inherited_quirks = set()
    if issues:
        raise PolicyConfigError(issues, source)
    if not require_budget and not any(merged.get(k) is not None for k in BUDGET_FIELDS):
        merged["ratio"] = 0.5  # placeholder: presets usually leave the budget to the user

    # 1. the document's own fields
    bad_fields: set[str] = set()
    try:
        PolicySpec.model_validate(merged)
    except ValidationError as exc:
        for issue in issues_from_validation(exc, PolicySpec):
            issues.append(issue)
            bad_fields.add(issue.path.split(".")[0])

    # 2. parts: names first (quirk names depend on which parts are present)
    found: dict[str, tuple[PartSpec, str, dict[str, Any]]] = {}
    for fname in PART_FIELDS:
        raw = _part_dict(merged.get(fname))
        if fname in bad_fields or raw is None:
            continue
        name = raw.get("name")
        if name is None:
            issues.append(
                ConfigIssue(
                    f"{fname}.name",
                    f"required: the name of a registered {_KIND_WORDS[fname]}; "
                    f"available: {', '.join(registry.names(fname)) or '(none registered)'}",
                )
            )
            continue
        try:
            spec, src = registry.part(fname, name)
        except UnknownPartError as exc:
            issues.append(
                ConfigIssue(f"{fname}.name", str(exc).replace(f"unknown {fname} ", f"unknown {_KIND_WORDS[fname]} ", 1))
            )
            continue
        found[fname] = (spec, src, {k: v for k, v in raw.items() if k != "name"})
    if "reducer" not in found and "reducer" not in bad_fields and merged.get("reducer") is None:
        if registry.has_part("reducer", DEFAULT_REDUCER):
            spec, src = registry.part("reducer", DEFAULT_REDUCER)
            found["reducer"] = (spec, src, {})
        else:
            issues.append(
                ConfigIssue(
                    "reducer",
                    f"required: name a reducer (the default, {DEFAULT_REDUCER!r}, is not registered: kvpolicy's "
                    f"built-in plugins are not installed); available: "
                    f"{', '.join(registry.names('reducer')) or '(none registered)'}",
                )
            )

    # 3. quirks
    known: dict[str, list[tuple[str, str]]] = {}
    for fname, (spec, _, _) in found.items():
        for pname in spec.params.model_fields:
            if pname.startswith("quirk_"):
                known.setdefault(pname[len("quirk_") :], []).append((fname, pname))
    for q in ENGINE_QUIRKS:
        known.setdefault(q, []).append(("engine", q))
    quirk_set: dict[tuple[str, str], bool] = {}
    rq = merged.get("reference_quirks", False)
    if "reference_quirks" not in bad_fields:
        if rq is True:
            quirk_set = {t: True for targets in known.values() for t in targets}
        elif isinstance(rq, Mapping):
            for key, on in rq.items():
                targets = _quirk_targets(str(key), known)
                if targets is None and str(key) in inherited_quirks:
                    continue  # set by the preset for a part the user replaced: not applicable
                if targets is None:
                    issues.append(
                        ConfigIssue(
                            f"reference_quirks.{key}",
                            f"unknown quirk {key!r}; known quirks of this policy: {', '.join(sorted(known))}"
                            + _did_you_mean(str(key), sorted(known)),
                        )
                    )
                    continue
                for t in targets:
                    quirk_set[t] = bool(on)

    # 3b. protected sinks: the policy's `sinks` and the part parameters that repeat it become one number
    sinks = _resolve_sinks(top, merged, found, bad_fields, issues)

    # 4. part parameters
    parts: dict[str, ResolvedPart] = {}
    for fname, (spec, src, given) in found.items():
        given = {**given, **{p: v for (f, p), v in sinks.params.items() if f == fname}}
        model = spec.params
        fields = list(model.model_fields)
        unknown = [k for k in given if k not in fields and not _is_alias(model, k)]
        for k in unknown:
            issues.append(
                ConfigIssue(
                    f"{fname}.{k}",
                    f"unknown parameter of {_KIND_WORDS[fname]} {spec.name!r} (value {given[k]!r}); "
                    f"parameters: {', '.join(fields) or '(none)'}" + _did_you_mean(str(k), fields),
                )
            )
        if unknown:
            continue
        values = {p: on for (f, p), on in quirk_set.items() if f == fname and p not in given}
        values.update(given)
        try:
            params = model.model_validate(values)
        except ValidationError as exc:
            issues += issues_from_validation(exc, model, prefix=fname, what="parameter")
            continue
        parts[fname] = ResolvedPart(fname, spec, src, params)

    # 5. budget
    budget = None
    if not ({"ratio", "tokens", "decode_budget"} & bad_fields):
        ratio, tokens, mode = merged.get("ratio"), merged.get("tokens"), merged.get("decode_budget")
        if ratio is not None and tokens is not None:
            issues.append(
                ConfigIssue(
                    "ratio",
                    f"both ratio ({ratio!r}) and tokens ({tokens!r}) are set; set exactly "
                    "one of ratio (fraction removed, in [0, 1)) or tokens (entries kept, >= 1)",
                )
            )
        elif ratio is None and tokens is None:
            issues.append(
                ConfigIssue(
                    "ratio",
                    "no budget: set ratio (fraction of the cache removed, in [0, 1)) or "
                    "tokens (entries kept per layer and kv head, >= 1)",
                )
            )
        elif mode == "fraction" and ratio is None:
            issues.append(
                ConfigIssue(
                    "decode_budget",
                    "'fraction' keeps the cache at (1 - ratio) of the tokens seen "
                    "and needs a ratio; with tokens use 'fixed' or 'off'",
                )
            )
        else:
            try:
                budget = Budget(ratio=ratio, tokens=tokens, decode=mode)
            except ValidationError as exc:
                issues += issues_from_validation(exc, Budget)

    # 6. capabilities
    if "reducer" in found:
        rspec = found["reducer"][0]
        for sfield in ("encode", "decode"):
            if sfield in found:
                sspec = found[sfield][0]
                missing = set(rspec.requires) - set(sspec.provides) - ENGINE_CAPABILITIES
                if missing:
                    issues.append(_capability_issue("reducer", rspec, sfield, sspec, missing))
    if "allocator" in found and "encode" in found:
        aspec, sspec = found["allocator"][0], found["encode"][0]
        missing = set(aspec.requires) - set(sspec.provides) - ENGINE_CAPABILITIES
        if missing:
            issues.append(_capability_issue("allocator", aspec, "encode", sspec, missing))

    if issues:
        raise PolicyConfigError(issues, source)
    assert budget is not None

    engine = {q: quirk_set.get(("engine", q), False) for q in ENGINE_QUIRKS}
    quirks: dict[str, bool] = {}
    for targets in known.values():
        for part_field, param in targets:
            if part_field == "engine":
                quirks[param] = engine[param]
            elif part_field in parts:
                quirks[f"{part_field}.{param}"] = bool(getattr(parts[part_field].params, param))
    name = _policy_name(top, source, merged)
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


def _resolve_sinks(
    top: Mapping[str, Any],
    merged: Mapping[str, Any],
    found: dict[str, tuple[PartSpec, str, dict[str, Any]]],
    bad_fields: set[str],
    issues: list[ConfigIssue],
) -> SinksResolution:
    """See :mod:`kvpolicy.sinks`: the user's document (``top``) wins over its presets (``merged`` minus ``top``)."""
    marked: dict[tuple[str, str], Any] = {}
    user: dict[tuple[str, str], Any] = {}
    given: dict[tuple[str, str], Any] = {}
    for fname, (spec, _, params) in found.items():
        top_part = _part_dict(top.get(fname))
        for p in sinks_params(spec.params):
            marked[fname, p] = spec.params.model_fields[p].default
            if p in params:
                given[fname, p] = params[p]
            if isinstance(top_part, Mapping) and p in top_part:
                user[fname, p] = top_part[p]
    ok = "sinks" not in bad_fields
    res = resolve_sinks(top.get("sinks") if ok else None, merged.get("sinks") if ok else None, user, given, marked)
    issues.extend(ConfigIssue(path, message) for path, message in res.issues)
    return res


def _policy_name(top: Mapping[str, Any], source: str | None, merged: Mapping[str, Any]) -> str:
    """The document's own ``name``, else the stem of the file it came from (a tuned policy saved as ``fast.yaml`` is
    ``fast`` in tables, legends and result files, not its preset's name), else the preset's name, else ``custom``."""
    if isinstance(top.get("name"), str) and top["name"]:
        return top["name"]
    if source is not None:
        return Path(source).stem
    return merged.get("name") or "custom"


def _is_alias(model: type[BaseModel], key: str) -> bool:
    return any(f.alias == key or f.validation_alias == key for f in model.model_fields.values())


def _quirk_targets(key: str, known: dict[str, list[tuple[str, str]]]) -> list[tuple[str, str]] | None:
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


def _capability_issue(field_: str, spec: PartSpec, sfield: str, sspec: PartSpec, missing: set[str]) -> ConfigIssue:
    return ConfigIssue(
        field_,
        f"{_KIND_WORDS[field_]} {spec.name!r} requires capability {', '.join(sorted(missing))!s} which the "
        f"{_KIND_WORDS[sfield]} {sspec.name!r} does not provide (it provides: {', '.join(sorted(sspec.provides)) or 'nothing'})",
    )


# ------------------------------------------------------------------------------------------------------- writing
_KEY_ORDER = ("name", "preset", *PART_FIELDS, "ratio", "tokens", "decode_budget", "reference_quirks", "sinks")


def policy_to_dict(spec: PolicySpec | ResolvedPolicy | CachePolicy) -> dict[str, Any]:
    """A plain, YAML-ready document for ``spec``: a :class:`PolicySpec` as written, or — for a
    :class:`ResolvedPolicy` or a :class:`CachePolicy` built by :func:`load_policy` — the explicit resolved policy,
    which :func:`load_policy` turns back into the same policy."""
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
