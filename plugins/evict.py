"""Eviction: the ``evict`` reducer and the ``full`` preset.

* ``evict`` (reducer): keep the ``keep`` best-scored valid entries of each row and kv head
  (:func:`kvpolicy.core.selection.select_top`: ties go to the older position, invalid slots are never kept), gather them
  as they are.
* ``full`` (preset): no encode and no decode scorer, ratio 0. The engine compresses nothing when a policy has no
  encode scorer and drops nothing when it has no decode scorer, so this is the uncompressed baseline run through the
  same engine (same attention function, same reports) — no "keep everything" scorer is needed.

The helpers the eviction baselines share (sinks, recent windows, ``protect_text``, head averaging, the cumulative
attention accumulator) are in :mod:`kvpolicy.parts`.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict

from kvpolicy.hookspecs import PartSpec, PresetSpec, hookimpl
from kvpolicy.parts import build, consumer_spec
from kvpolicy.core.policy import LayerView, Reduction
from kvpolicy.core.selection import select_top


# ===================================================================================================== evict


class EvictParams(BaseModel):
    """The ``evict`` reducer has no parameters."""

    model_config = ConfigDict(extra="forbid")


class Evict:
    """Plain eviction (``evict`` reducer), used by every eviction baseline (H2O, TOVA, SnapKV, StreamingLLM, ...).

    Keeps, per row and kv head, the ``keep`` valid entries with the highest scores (ties to the older position;
    ``+inf`` entries first), gathered unchanged and laid out in positional order. A decode-time drop evicts (no
    ``on_drop``)."""

    def __init__(self, params: EvictParams | None = None, **kwargs: Any):
        self.params = build(Evict, EvictParams, params, kwargs)

    def reduce(self, view: LayerView, scores: torch.Tensor, keep: torch.Tensor) -> Reduction:
        return select_top(view, scores, keep)


# ===================================================================================================== registration


@hookimpl
def kvpolicy_parts() -> list[PartSpec]:
    return [
        consumer_spec(
            name="evict",
            kind="reducer",
            params=EvictParams,
            factory=Evict,
            summary="keep the top-scored entries (ties to the older position), drop the rest",
        ),
    ]


@hookimpl
def kvpolicy_presets() -> list[PresetSpec]:
    return [
        PresetSpec(
            name="full",
            summary="no compression: every entry kept at prefill and while decoding (the reference run)",
            policy={"reducer": {"name": "evict"}, "ratio": 0.0},
        ),
    ]
