"""kvpolicy: KV-cache compression policies as plugins, run inside Hugging Face models.

The public API in one place: build a :class:`CachePolicy` from parts, ``attach(model)``, then
``model.generate(..., past_key_values=make_cache(model, policy))``.
"""

from .cache import PolicyCache, PolicyLayer, UnsupportedModelError
from .engine import attach, check_model, make_cache
from .models import load_model
from .policy import (
    GENERATED,
    IMAGE,
    TEXT,
    AttentionStat,
    Budget,
    BudgetAllocator,
    CachePolicy,
    DecodeScorer,
    EncodeScorer,
    LayerView,
    Reducer,
    Reduction,
)
from .selection import ranked_slots, select_top

__version__ = "0.1.0"

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
