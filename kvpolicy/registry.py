"""Finding parts and presets: every plugin of the ``kvpolicy.plugins`` entry-point group, loaded with pluggy.

A plugin is a module that implements :func:`kvpolicy.hookspecs.kvpolicy_parts` and/or
:func:`kvpolicy.hookspecs.kvpolicy_presets` with ``@hookimpl``. :class:`Registry` imports every module listed under the
entry-point group, asks each for its contributions and indexes them by ``(kind, name)``.

Loading is **isolated**: a plugin whose import fails, whose hook raises, or which contributes a malformed part (not a
:class:`~kvpolicy.hookspecs.PartSpec`, ``params`` not a pydantic model, an unknown ``kind``, a name already taken by
another package) is recorded as a :class:`PluginProblem` and skipped; every other plugin still loads. ``kvpolicy
plugins`` lists the problems.

Precedence: the ``kvpolicy`` distribution's own plugins load first, then the others sorted by distribution and entry
point name, and the first registration of a ``(kind, name)`` wins, so a third-party package can never shadow a built-in
part.

Typical use::

    from kvpolicy.registry import get_registry
    spec, source = get_registry().part("encode", "frequency")
"""

from __future__ import annotations

import difflib
import importlib
import re
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import metadata
from typing import Any, NamedTuple

import pluggy
from pydantic import BaseModel
from pydantic_core import to_jsonable_python

from . import hookspecs
from .hookspecs import ENTRY_POINT_GROUP, PROJECT, PartSpec, PresetSpec
from .params import ParamInfo, param_info, type_name

__all__ = [
    "KINDS",
    "STAGES",
    "ParamInfo",
    "PluginProblem",
    "RegisteredPart",
    "RegisteredPreset",
    "Registry",
    "UnknownPartError",
    "canonical_package",
    "get_registry",
    "param_info",
    "reset_registry",
    "type_name",
]

#: the part kinds, in the order a policy document lists them
KINDS: tuple[str, ...] = ("encode", "decode", "reducer", "allocator")
#: when each kind of part runs
STAGES: dict[str, str] = {
    "encode": "prefill",
    "decode": "decode",
    "reducer": "prefill+decode",
    "allocator": "prefill",
}
#: the distribution whose plugins load first (built-ins)
CORE_PACKAGE = "kvpolicy"


@dataclass(frozen=True)
class PluginProblem:
    """A plugin (or one of its contributions) that could not be used. ``plugin``: the entry point or module name;
    ``package``: the distribution that declares it; ``error``: what went wrong, in one line."""

    plugin: str
    package: str
    error: str
    #: the contribution the problem is about, ``(kind, name)`` (kind ``"preset"`` for a preset), when known
    part: tuple[str, str] | None = None
    #: whether the plugin itself loaded (only one of its contributions was rejected); ``False``: it contributed nothing
    loaded: bool = False

    def __str__(self) -> str:
        return f"plugin {self.plugin!r} from {self.package}: {self.error}"


class RegisteredPart(NamedTuple):
    """A part and the distribution that contributed it (unpacks as ``spec, source``)."""

    spec: PartSpec
    source: str


class RegisteredPreset(NamedTuple):
    """A preset and the distribution that contributed it (unpacks as ``spec, source``)."""

    spec: PresetSpec
    source: str


class UnknownPartError(LookupError):
    """No part of that kind has that name. The message lists the available names (and a close match, if any).

    ``problems``: plugins that failed to load (or a rejected contribution of that very name): one of them may be
    where the part was meant to come from, so the message says so before listing what is available."""

    def __init__(self, kind: str, name: Any, available: Iterable[str], problems: Iterable[PluginProblem] = ()):
        self.kind = kind
        self.name = name
        self.available = sorted(available)
        self.problems = list(problems)
        listed = ", ".join(self.available) if self.available else "(none registered)"
        msg = f"unknown {kind} {name!r}"
        for p in self.problems:
            what = "could not register it" if p.loaded else "failed to load"
            msg += f": plugin {p.plugin!r} (package {p.package}) {what}: {p.error}"
        msg += f"; available: {listed}"
        if isinstance(name, str):
            close = difflib.get_close_matches(name, self.available, n=1)
            if close:
                msg += f" (did you mean {close[0]!r}?)"
        self.message = msg
        super().__init__(msg)

    def __str__(self) -> str:
        return self.message


def canonical_package(name: str) -> str:
    """A distribution name in its normalised form (PEP 503): ``Kvpolicy_Example.Plugin`` -> ``kvpolicy-example-plugin``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


# ---------------------------------------------------------------------------------------------------------- registry
class Registry:
    """Every part and preset contributed by the installed plugins.

    ``Registry()`` discovers the installed entry points of group ``kvpolicy.plugins``; pass ``entry_points=()`` for an
    empty registry (tests), or a list of :class:`importlib.metadata.EntryPoint` to load exactly those.
    :meth:`register_module` adds an in-process module. Problems never raise: they are collected in :attr:`problems`.
    """

    def __init__(self, entry_points: Iterable[metadata.EntryPoint] | None = None):
        self.pm = pluggy.PluginManager(PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.problems: list[PluginProblem] = []
        self._parts: dict[str, dict[str, RegisteredPart]] = {k: {} for k in KINDS}
        self._presets: dict[str, RegisteredPreset] = {}
        self._plugins: dict[str, str] = {}  # pluggy name -> package
        eps = discover_entry_points() if entry_points is None else list(entry_points)
        for ep in eps:
            self.load_entry_point(ep)

    # ------------------------------------------------------------------ loading
    def load_entry_point(self, ep: metadata.EntryPoint, source: str | None = None) -> list[PluginProblem]:
        """Import ``ep`` and register what it contributes. ``source`` defaults to the entry point's distribution.
        Returns the problems found (also appended to :attr:`problems`)."""
        dist = getattr(ep, "dist", None)
        package = source or (canonical_package(dist.name) if dist is not None and dist.name else "unknown")
        try:
            obj = ep.load()
        except BaseException as exc:
            if isinstance(exc, KeyboardInterrupt):
                raise
            return self._problem(ep.name, package, f"import of {ep.value!r} failed: {_one_line(exc)}")
        return self._register(obj, plugin=ep.name, package=package, pm_name=f"{package}:{ep.name}")

    def register_module(self, module: Any, source: str = "in-process", name: str | None = None) -> list[PluginProblem]:
        """Register an already imported module (or any object carrying ``@hookimpl`` functions), e.g. from a test.
        ``source`` is shown as its package. Returns the problems found (also appended to :attr:`problems`)."""
        plugin = name or getattr(module, "__name__", None) or type(module).__name__
        return self._register(module, plugin=plugin, package=source, pm_name=f"{source}:{plugin}")

    def load_module(self, module_path: str, source: str = "in-process") -> list[PluginProblem]:
        """Import ``module_path`` and register it, with the same isolation as an entry point."""
        try:
            module = importlib.import_module(module_path)
        except BaseException as exc:
            if isinstance(exc, KeyboardInterrupt):
                raise
            return self._problem(module_path, source, f"import of {module_path!r} failed: {_one_line(exc)}")
        return self.register_module(module, source=source)

    def _problem(
        self, plugin: str, package: str, error: str, part: tuple[str, str] | None = None, loaded: bool = False
    ) -> list[PluginProblem]:
        problem = PluginProblem(plugin=plugin, package=package, error=error, part=part, loaded=loaded)
        self.problems.append(problem)
        return [problem]

    def _register(self, obj: Any, plugin: str, package: str, pm_name: str) -> list[PluginProblem]:
        if self.pm.is_registered(obj) or self.pm.has_plugin(pm_name):
            return self._problem(plugin, package, "already registered", loaded=True)
        try:
            self.pm.register(obj, name=pm_name)
        except Exception as exc:  # noqa: BLE001 - pluggy.PluginValidationError: wrong hook signature, ...
            return self._problem(plugin, package, f"invalid hook implementation: {_one_line(exc)}")

        impls: dict[str, list[Any]] = {}
        unknown: list[str] = []
        for caller in self.pm.get_hookcallers(obj) or []:
            mine = [i for i in caller.get_hookimpls() if i.plugin is obj]
            if not caller.has_spec():
                unknown.append(caller.name)
            else:
                impls.setdefault(caller.name, []).extend(mine)
        if unknown or not impls:
            self.pm.unregister(obj)
            if unknown:
                expected = "kvpolicy_parts, kvpolicy_presets"
                return self._problem(
                    plugin, package, f"unknown hook(s) {', '.join(sorted(unknown))}; the hooks are {expected}"
                )
            return self._problem(
                plugin,
                package,
                "no @hookimpl found (decorate kvpolicy_parts / kvpolicy_presets with kvpolicy.hookspecs.hookimpl)",
            )

        # call both hooks first: a plugin whose hook raises contributes nothing at all
        results: dict[str, list[Any]] = {}
        for hook, hook_impls in impls.items():
            items: list[Any] = []
            for impl in hook_impls:
                try:
                    out = impl.function()
                    if out is None:
                        continue
                    if isinstance(out, (str, bytes, dict)) or not isinstance(out, Iterable):
                        self.pm.unregister(obj)
                        return self._problem(
                            plugin, package, f"hook {hook}() must return a list, got {type(out).__name__}"
                        )
                    items.extend(out)  # a generator may raise here too
                except BaseException as exc:
                    if isinstance(exc, KeyboardInterrupt):
                        raise
                    self.pm.unregister(obj)
                    return self._problem(plugin, package, f"hook {hook}() raised {_one_line(exc)}")
            results[hook] = items

        self._plugins[pm_name] = package
        found: list[PluginProblem] = []
        for item in results.get("kvpolicy_parts", []):
            error = self._check_part(item, package)
            if error:
                part = (str(item.kind), str(item.name)) if isinstance(item, PartSpec) else None
                found += self._problem(plugin, package, error, part=part, loaded=True)
            elif item.name not in self._parts[item.kind]:
                self._parts[item.kind][item.name] = RegisteredPart(item, package)
        for item in results.get("kvpolicy_presets", []):
            error = self._check_preset(item, package)
            if error:
                part = ("preset", str(item.name)) if isinstance(item, PresetSpec) else None
                found += self._problem(plugin, package, error, part=part, loaded=True)
            elif item.name not in self._presets:
                self._presets[item.name] = RegisteredPreset(item, package)
        return found

    def _check_part(self, item: Any, package: str) -> str | None:
        if not isinstance(item, PartSpec):
            return f"kvpolicy_parts() returned {type(item).__name__} {_short(item)}, not a PartSpec"
        label = f"part {item.name!r}"
        if not isinstance(item.name, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_\-]*", item.name):
            return f"part name {item.name!r} is not an identifier"
        if item.kind not in KINDS:
            return f"{label}: kind {item.kind!r} is not one of {', '.join(KINDS)}"
        if not (isinstance(item.params, type) and issubclass(item.params, BaseModel)):
            return f"{label}: params must be a pydantic BaseModel subclass, got {_short(item.params)}"
        if not callable(item.factory):
            return f"{label}: factory is not callable"
        for attr in ("provides", "requires"):
            tags = getattr(item, attr)
            if (
                isinstance(tags, str)
                or not isinstance(tags, (set, frozenset))
                or not all(isinstance(t, str) for t in tags)
            ):
                return f"{label}: {attr} must be a frozenset of strings, got {_short(tags)}"
        for fname, finfo in item.params.model_fields.items():
            if fname.startswith("quirk_") and finfo.annotation is not bool:
                return f"{label}: quirk parameter {fname!r} must be a bool, got {type_name(finfo.annotation)}"
            if fname == "name":
                return f"{label}: a parameter may not be called 'name' (it names the part in a policy)"
        existing = self._parts[item.kind].get(item.name)
        if existing is not None:
            if existing.spec is item or existing.spec == item:
                return None  # the very same part registered twice: harmless
            if existing.source != package:
                return (
                    f"{item.kind} {item.name!r} is already provided by package {existing.source!r}; "
                    "rename the part (the first registration wins)"
                )
            return f"{item.kind} {item.name!r} is contributed twice by package {package!r}"
        return None

    def _check_preset(self, item: Any, package: str) -> str | None:
        if not isinstance(item, PresetSpec):
            return f"kvpolicy_presets() returned {type(item).__name__} {_short(item)}, not a PresetSpec"
        if not isinstance(item.name, str) or not item.name:
            return f"preset name {item.name!r} is not a string"
        if not isinstance(item.policy, dict):
            return f"preset {item.name!r}: policy must be a dict, got {type(item.policy).__name__}"
        existing = self._presets.get(item.name)
        if existing is not None and not (existing.spec is item or existing.spec == item):
            if existing.source != package:
                return f"preset {item.name!r} is already provided by package {existing.source!r}"
            return f"preset {item.name!r} is contributed twice by package {package!r}"
        return None

    # ------------------------------------------------------------------ lookup
    def part(self, kind: str, name: str) -> RegisteredPart:
        """``(PartSpec, source_package)`` of the part ``name`` of ``kind``; :class:`UnknownPartError` if there is none."""
        if kind not in self._parts:
            raise UnknownPartError("part kind", kind, KINDS)
        try:
            return self._parts[kind][name]
        except (KeyError, TypeError):
            raise UnknownPartError(kind, name, self._parts[kind], self.suspects(kind, name)) from None

    def has_part(self, kind: str, name: str) -> bool:
        return name in self._parts.get(kind, {})

    def parts(self, kind: str | None = None) -> list[RegisteredPart]:
        """Every registered part (of ``kind``), sorted by kind then name."""
        kinds = KINDS if kind is None else (kind,)
        return [self._parts[k][n] for k in kinds for n in sorted(self._parts.get(k, {}))]

    def names(self, kind: str) -> list[str]:
        """The registered names of ``kind``, sorted."""
        return sorted(self._parts.get(kind, {}))

    def presets(self) -> dict[str, RegisteredPreset]:
        """Every registered preset by name (sorted): ``name -> (PresetSpec, source_package)``."""
        return {n: self._presets[n] for n in sorted(self._presets)}

    def preset(self, name: str) -> RegisteredPreset:
        try:
            return self._presets[name]
        except (KeyError, TypeError):
            raise UnknownPartError("preset", name, self._presets, self.suspects("preset", name)) from None

    def suspects(self, kind: str, name: Any) -> list[PluginProblem]:
        """Problems that may explain why ``name`` of ``kind`` is unknown: its own rejected contribution if there is
        one, otherwise every plugin that failed to load (their parts are unknown, so any of them may be it)."""
        own = [p for p in self.problems if p.part == (kind, name)]
        return own or [p for p in self.problems if not p.loaded]

    def plugins(self) -> dict[str, str]:
        """Loaded plugins: pluggy name (``package:plugin``) -> package."""
        return dict(self._plugins)

    def listing(self, preset_status: Mapping[str, str | None]) -> dict[str, Any]:
        """Everything ``kvpolicy plugins --json`` prints: parts (with parameter descriptions), presets, problems.

        ``preset_status``: each preset's problem (``None``: it resolves), from
        :func:`kvpolicy.config.preset_problems` — checking a preset means resolving it, which is the policy
        documents' job, not the registry's (so the registry never imports :mod:`kvpolicy.config`)."""
        return {
            "parts": [
                {
                    "name": p.spec.name,
                    "kind": p.spec.kind,
                    "stage": STAGES[p.spec.kind],
                    "source": p.source,
                    "summary": p.spec.summary,
                    "provides": sorted(p.spec.provides),
                    "requires": sorted(p.spec.requires),
                    "params": [i.as_dict() for i in param_info(p.spec.params)],
                    "status": "ok",
                }
                for p in self.parts()
            ],
            "presets": [
                {
                    "name": n,
                    "summary": p.spec.summary,
                    "source": p.source,
                    "policy": to_jsonable_python(p.spec.policy, fallback=repr),
                    "status": "ok" if preset_status.get(n) is None else f"invalid: {preset_status[n]}",
                }
                for n, p in self.presets().items()
            ],
            "problems": [{"plugin": p.plugin, "package": p.package, "error": p.error} for p in self.problems],
        }


def _short(obj: Any, limit: int = 60) -> str:
    text = repr(obj)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def discover_entry_points() -> list[metadata.EntryPoint]:
    """The installed entry points of group ``kvpolicy.plugins``: kvpolicy's own first, then by package and name."""
    eps = list(metadata.entry_points(group=ENTRY_POINT_GROUP))

    def key(ep: metadata.EntryPoint) -> tuple[int, str, str]:
        dist = getattr(ep, "dist", None)
        package = canonical_package(dist.name) if dist is not None and dist.name else ""
        return (package != CORE_PACKAGE, package, ep.name)

    return sorted(eps, key=key)


_lock = threading.Lock()
_registry: Registry | None = None


def get_registry(refresh: bool = False) -> Registry:
    """The process-wide registry of installed plugins, built on first use (``refresh=True`` rebuilds it)."""
    global _registry
    with _lock:
        if _registry is None or refresh:
            _registry = Registry()
        return _registry


def reset_registry(registry: Registry | None = None) -> None:
    """Forget the cached registry (the next :func:`get_registry` rediscovers), or install ``registry`` in its place."""
    global _registry
    with _lock:
        _registry = registry
