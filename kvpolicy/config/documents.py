"""Policy documents before validation: reading one (file, preset name, YAML text, mapping, :class:`PolicySpec`),
laying one over another, turning dotted overrides into documents and expanding a document's preset chain.

YAML is read with ``yaml.safe_load`` only: a policy file is data, never code."""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigIssue
from ..registry import Registry, UnknownPartError
from .spec import BUDGET_FIELDS, PART_FIELDS, PartRef, PolicyConfigError, PolicySpec

__all__ = ["expand_presets", "merge_documents", "nest_overrides", "part_dict", "read_policy_document"]


def part_dict(value: Any) -> Any:
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
    """Lay the policy document ``top`` over ``base`` (see :mod:`kvpolicy.config` for the rules)."""
    out = copy.deepcopy(dict(base))
    if any(k in top for k in BUDGET_FIELDS):
        for k in BUDGET_FIELDS:
            out.pop(k, None)
    for key, value in top.items():
        if key in PART_FIELDS and value is not None and out.get(key) is not None:
            lower, upper = part_dict(out[key]), part_dict(value)
            if isinstance(lower, dict) and isinstance(upper, dict) and upper.get("name") in (None, lower.get("name")):
                out[key] = _deep_merge(lower, upper)
            else:
                out[key] = copy.deepcopy(upper)
        elif key in PART_FIELDS:
            out[key] = copy.deepcopy(part_dict(value))
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


def expand_presets(
    doc: dict[str, Any], registry: Registry, issues: list[ConfigIssue]
) -> tuple[dict[str, Any], set[str]]:
    """The document laid over its preset chain, and the quirk names that only the presets (not ``doc``) set.
    A bad preset reference is appended to ``issues`` (and ``doc`` returned unexpanded)."""
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
