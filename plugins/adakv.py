"""AdaKV: one layer budget shared by its kv heads, allocated to the heads whose entries score highest.

Feng et al., 2024, "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation for Efficient LLM Inference"
(arXiv 2407.11550; authors' code github.com/FFY0/AdaKV).

* ``adakv`` (reducer): per row, the layer keeps ``H * keep`` entries in total. Every kv head first keeps its
  ``floor(alpha * keep)`` best entries (the paper's safeguard, ``alpha`` = 0.2 in its experiments); the rest of the
  budget goes to the best-scored remaining entries across *all* heads of the layer, so a head whose attention is
  concentrated keeps few entries and a head whose attention is spread keeps many. Scores must be per kv head and
  comparable across heads (attention probabilities are: SnapKV's window votes, H2O's accumulated attention).
* preset ``adakv``: SnapKV scores (per kv head, window 32, avg pooling) + this reducer, ratio 0.5 — the paper's main
  configuration ("Ada-SnapKV").

Memory: the kept counts differ per head, and the engine stores the layer's heads in buckets of similar length
(``kvpolicy/buckets.py``), so the bytes held stay within a few percent of the total budget instead of ``H`` times
the longest head — the masking-only approach of other frameworks saves nothing.

Deviations: the authors flatten the scores of all heads and take a single top-k after adding the floor entries; the
selection here is the same set (ties broken toward the older position, then the lower head). Prefill only, as in the
paper; the authors' code also offers GQA-aware score averaging — here scores are already per kv head (the engine
averages each group's query heads).
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from kvpolicy.hookspecs import PartSpec, PresetSpec, hookimpl
from kvpolicy.parts import Share, consumer_spec
from kvpolicy.core.policy import LayerView, Reduction
from kvpolicy.core.selection import select_top, shared_head_budgets

PAPER = 'Feng et al., 2024, "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation"'


class AdaKVParams(BaseModel):
    """Parameters of the ``adakv`` reducer."""

    model_config = ConfigDict(extra="forbid")

    alpha: Share = Field(
        default=0.2,
        description="safeguard: fraction of the uniform per-head budget every head keeps (paper: 0.2)",
    )


class AdaKVReducer:
    """Adaptive per-head budgets, evicting: see the module docstring."""

    def __init__(self, params: AdaKVParams | None = None, **kwargs: Any):
        self.params = params if params is not None else AdaKVParams(**kwargs)

    def reduce(self, view: LayerView, scores: torch.Tensor, keep: torch.Tensor) -> Reduction:
        if scores.dim() != 3 or scores.shape[1] != view.num_heads:
            raise ValueError(
                f"adakv needs scores per kv head [B, H, P] (H={view.num_heads}); got {tuple(scores.shape)}: "
                "use an encode scorer with per_head: true"
            )
        return select_top(view, scores, shared_head_budgets(view, scores, keep, self.params.alpha))


@hookimpl
def kvpolicy_parts() -> list[PartSpec]:
    return [
        consumer_spec(
            name="adakv",
            kind="reducer",
            params=AdaKVParams,
            factory=AdaKVReducer,
            summary="AdaKV: the layer's budget allocated across kv heads by score (a floor per head), evicting",
            requires=frozenset({"scores", "per_head_scores"}),
        ),
    ]


@hookimpl
def kvpolicy_presets() -> list[PresetSpec]:
    return [
        PresetSpec(
            name="adakv",
            summary="Ada-SnapKV: SnapKV votes per kv head, budgets allocated across heads (alpha 0.2), half removed",
            policy={"encode": {"name": "snapkv"}, "reducer": {"name": "adakv"}, "ratio": 0.5},
        ),
    ]
