"""The stable plugin API for choosing slots by score (re-exported from :mod:`kvpolicy.core.selection`).

Third-party reducers import the shared ranking rule from here (``from kvpolicy.selection import select_top``), so
these names stay put however the engine is laid out inside :mod:`kvpolicy.core`. Code inside kvpolicy imports the core
module.
"""

from __future__ import annotations

from .core.selection import lowest_slot, ranked_slots, select_top, sort_by_position

__all__ = ["lowest_slot", "ranked_slots", "select_top", "sort_by_position"]
