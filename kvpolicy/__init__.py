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
        LOGIT_BIAS,
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
    from .eval.compressed import CompressedContext, compress_context

#: submodule -> the public names it defines, the one list of the package's API (``__all__`` and the lazy loader are
#: built from it; the ``TYPE_CHECKING`` imports above state the same names for type checkers, which cannot read a
#: table). Imported lazily (PEP 562) because these modules import torch and transformers (seconds), and the command
#: line imports this package just to answer ``--help``.
_PUBLIC: dict[str, tuple[str, ...]] = {
    "core.budget": ("Budget", "BudgetAllocator"),
    "core.cache": ("PolicyCache", "UnsupportedModelError"),
    "core.engine": ("attach", "check_model", "make_cache"),
    "core.layer": ("PolicyLayer",),
    "core.partcheck": ("PartError",),
    "core.policy": tuple(
        "GENERATED IMAGE LOGIT_BIAS TEXT AttentionStat CachePolicy DecodeScorer EncodeScorer LayerView Reducer Reduction".split()
    ),
    "core.reuse": ("CacheReuseError",),
    "core.selection": ("ranked_slots", "select_top"),
    "eval.compressed": ("CompressedContext", "compress_context"),
    "models": ("load_model",),
}

#: public name -> the submodule defining it
_LAZY = {name: module for module, names in _PUBLIC.items() for name in names}

__version__ = "0.1.0"

__all__ = sorted(_LAZY)


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
