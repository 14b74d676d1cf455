"""kvpolicy: KV-cache compression policies as plugins, run inside Hugging Face models.

The public API in one place: build a :class:`CachePolicy` from parts, ``attach(model)``, then
``model.generate(..., past_key_values=make_cache(model, policy))``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the names below, for type checkers and IDEs; at run time they load on first use
    from .core.budget import Budget, BudgetAllocator
    from .core.cache import PolicyCache, UnsupportedModelError
    from .core.engine import attach, check_model, make_cache
    from .core.layer import PolicyLayer
    from .models import load_model
    from .core.partcheck import PartError
    from .core.policy import (
        GENERATED,
        IMAGE,
        TEXT,
        AttentionStat,
        CachePolicy,
        DecodeScorer,
        EncodeScorer,
        LayerView,
        Reducer,
        Reduction,
    )
    from .core.reuse import CacheReuseError
    from .core.selection import ranked_slots, select_top

#: public name -> the submodule defining it. Imported lazily (PEP 562) because these modules import torch and
#: transformers (seconds), and the command line imports this package just to answer ``--help``.
_LAZY = {
    **dict.fromkeys(("PolicyCache", "UnsupportedModelError"), "core.cache"),
    "PolicyLayer": "core.layer",
    **dict.fromkeys(("attach", "check_model", "make_cache"), "core.engine"),
    "PartError": "core.partcheck",
    "CacheReuseError": "core.reuse",
    **dict.fromkeys(("Budget", "BudgetAllocator"), "core.budget"),
    "load_model": "models",
    **dict.fromkeys(
        (
            "GENERATED",
            "IMAGE",
            "TEXT",
            "AttentionStat",
            "CachePolicy",
            "DecodeScorer",
            "EncodeScorer",
            "LayerView",
            "Reducer",
            "Reduction",
        ),
        "core.policy",
    ),
    **dict.fromkeys(("ranked_slots", "select_top"), "core.selection"),
}

__version__ = "0.1.0"

__all__ = [
    "GENERATED",
    "IMAGE",
    "TEXT",
    "AttentionStat",
    "Budget",
    "BudgetAllocator",
    "CachePolicy",
    "CacheReuseError",
    "DecodeScorer",
    "EncodeScorer",
    "LayerView",
    "PartError",
    "PolicyCache",
    "PolicyLayer",
    "Reducer",
    "Reduction",
    "UnsupportedModelError",
    "attach",
    "check_model",
    "load_model",
    "make_cache",
    "ranked_slots",
    "select_top",
]


def __getattr__(name: str) -> Any:
    """Load a public name from its submodule on first access (then cache it in the package namespace)."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
