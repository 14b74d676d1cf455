"""How plugins are found: the pluggy hook specifications, all in one module.

A plugin is an ordinary module listed under the ``kvpolicy.plugins`` entry-point group of its package's
``pyproject.toml``; it implements one or both hooks below with ``@hookimpl``. The built-in policies under
``plugins/`` (installed as ``kvpolicy_plugins``) are registered exactly the same way.

Each contributed part is a :class:`PartSpec`: a name, a stage, a pydantic model of its parameters (types, ranges,
defaults and descriptions — what ``kvpolicy plugins`` shows and what a YAML policy is validated against) and a
factory that builds the part from validated parameters.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import pluggy
from pydantic import BaseModel

PROJECT = "kvpolicy"
ENTRY_POINT_GROUP = "kvpolicy.plugins"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

PartKind = Literal["encode", "decode", "reducer", "allocator"]


@dataclass(frozen=True)
class PartSpec:
    """One named part a plugin contributes.

    ``requires``/``provides`` are capability tags checked when a policy is composed, so that an incompatible
    combination is a validation error before any model loads: a reducer that ``requires={"per_head_scores"}`` cannot
    be paired with an encode scorer that does not ``provide`` it. Tags used by the built-ins: ``scores`` (every
    scorer), ``per_head_scores`` (scores with a kv-head axis), ``token_types`` (needs modality spans).
    """

    name: str
    kind: PartKind
    params: type[BaseModel]
    factory: Callable[[Any], Any]
    summary: str
    provides: frozenset[str] = field(default_factory=lambda: frozenset({"scores"}))
    requires: frozenset[str] = field(default_factory=frozenset)


@dataclass(frozen=True)
class PresetSpec:
    """A ready-made policy: a name, a one-line summary, and the policy document (as a user would write it in YAML)."""

    name: str
    summary: str
    policy: dict[str, Any]


@hookspec
def kvpolicy_parts() -> list[PartSpec]:  # type: ignore[empty-body]
    """Return the parts (encode scorers, decode scorers, reducers, budget allocators) this plugin contributes."""


@hookspec
def kvpolicy_presets() -> list[PresetSpec]:  # type: ignore[empty-body]
    """Return ready-made policies built from registered parts (e.g. ``elastic``)."""
