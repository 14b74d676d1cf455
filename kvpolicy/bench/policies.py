"""The policies a bench run measures: registered presets or policy files, resolved through kvpolicy's own loader
(:func:`kvpolicy.config.load_policy`) and the plugin registry, so the bench measures exactly what ``kvpolicy run``
would run. The bench defines no policy of its own."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..core.policy import CachePolicy
from .spec import DEFAULT_POLICIES, jsonable


def resolve_policy(name: str, ratio: float, decode_budget: str | None = None) -> CachePolicy:
    """A :class:`~kvpolicy.core.policy.CachePolicy` for ``name`` at ``ratio`` (fraction removed).

    ``name`` is a registered preset or a policy file (YAML/JSON). ``decode_budget`` overrides the decode-stage rule
    (``fixed`` for the long run)."""
    from ..config import load_policy
    from ..registry import get_registry

    overrides: dict[str, Any] = {"ratio": ratio}
    if decode_budget is not None:
        overrides["decode_budget"] = decode_budget
    path = Path(name)
    if path.suffix in (".yaml", ".yml", ".json") and path.exists():
        return load_policy(path, overrides=overrides)
    registry = get_registry()
    if name not in registry.presets():
        raise ValueError(
            f"unknown policy {name!r}: registered presets: {', '.join(registry.presets()) or '(none)'}; "
            "or a policy file (.yaml/.json)"
        )
    return load_policy({"preset": name}, registry=registry, overrides=overrides)


def needs_stats(name: str) -> bool:
    """Whether the policy's prefill computes attention statistics (False where it does not resolve)."""
    try:
        return bool(resolve_policy(name, 0.5).prefill_needs())
    except Exception:  # noqa: BLE001 - not loadable: the run reports it when it resolves the policy
        return False


def default_policies(quick: bool = False) -> list[str]:
    """The registered presets among :data:`~.spec.DEFAULT_POLICIES` that load; with ``quick`` one attention-free
    and one attention-statistics policy of them."""
    found = []
    for name in DEFAULT_POLICIES:
        try:
            resolve_policy(name, 0.5)
        except Exception:  # noqa: BLE001, S112 - not registered or not loadable: not a default
            continue
        found.append(name)
    if not found:
        raise ValueError(
            f"none of the default policies ({', '.join(DEFAULT_POLICIES)}) is registered: name --policies"
        )
    if quick:
        free = [n for n in found if not needs_stats(n)]
        stats = [n for n in found if needs_stats(n)]
        found = (free[:1] + stats[:1]) or found[:2]
    return found


def policy_doc(policy: CachePolicy) -> dict[str, Any]:
    """The policy as an explicit document (for the result's provenance)."""
    from ..config import policy_to_dict

    return jsonable(policy_to_dict(policy))
