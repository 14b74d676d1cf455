"""The stable plugin API: what a policy part implements and receives (re-exported from :mod:`kvpolicy.core.policy`
and :mod:`kvpolicy.core.budget`).

Third-party plugins import from here (``from kvpolicy.policy import AttentionStat, LayerView``), so these names stay
put however the engine is laid out inside :mod:`kvpolicy.core`. Code inside kvpolicy imports the core modules.
"""

from __future__ import annotations

from .core.budget import Budget, BudgetAllocator
from .core.policy import (
    GENERATED,
    IMAGE,
    TEXT,
    AttentionStat,
    CachePolicy,
    DecodeScorer,
    EncodeScorer,
    LayerView,
    Need,
    Reducer,
    Reduction,
    Stage,
    part_sinks,
)

__all__ = [
    "GENERATED",
    "IMAGE",
    "TEXT",
    "AttentionStat",
    "Budget",
    "BudgetAllocator",
    "CachePolicy",
    "DecodeScorer",
    "EncodeScorer",
    "LayerView",
    "Need",
    "Reducer",
    "Reduction",
    "Stage",
    "part_sinks",
]
