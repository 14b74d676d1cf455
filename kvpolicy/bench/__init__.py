"""``kvpolicy bench`` as a package (being split out of the former ``bench.py``): names forward to :mod:`.run`."""

from __future__ import annotations

import importlib
from typing import Any


def __getattr__(name: str) -> Any:
    return getattr(importlib.import_module(f"{__name__}.run"), name)
