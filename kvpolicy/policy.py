"""The stable plugin API: what a policy part implements and receives (re-exported from :mod:`kvpolicy.core.policy`,
which itself re-exports :class:`~kvpolicy.core.budget.Budget` and :class:`~kvpolicy.core.budget.BudgetAllocator`).

Third-party plugins import from here (``from kvpolicy.policy import AttentionStat, LayerView``), so these names stay
put however the engine is laid out inside :mod:`kvpolicy.core`. Code inside kvpolicy imports the core modules.

Why a star import: the list of names is stated once, as the core's ``__all__``; this module offers exactly that list
(tests/test_core_layout.py pins it, so a name the core drops cannot silently leave the plugin API).
"""

from __future__ import annotations

from .core.policy import *  # noqa: F403 - the plugin API is the core contract's __all__, stated there once
from .core.policy import __all__  # noqa: F401 - the same list: what this module offers
