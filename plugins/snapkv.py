"""SnapKV: rank prompt entries by the attention of an observation window, pooled over neighbouring keys.

Li et al., NeurIPS 2024, "SnapKV: LLM Knows What You are Looking for Before Generation" (arXiv 2404.14469;
authors' code github.com/FasterDecoding/SnapKV, ``snapkv_utils.py: SnapKVCluster``).

* ``snapkv`` (encode scorer): the attention each entry receives from the last ``window`` prompt queries
  (``AttentionStat(window)``), per kv head, smoothed by a 1-D max or average pooling over neighbouring positions
  (``kernel_size``); the observation window itself always kept. Prefill only: no decode part;
* preset ``snapkv`` (ratio 0.5).

:func:`snapkv_scores` is reused by ``pyramidkv``.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator

from kvpolicy.hookspecs import PartSpec, PresetSpec, hookimpl
from kvpolicy.parts import build, check_attention, heads, protect, protect_text, recent
from kvpolicy.core.policy import AttentionStat, LayerView

PAPER = 'Li et al., NeurIPS 2024, "SnapKV: LLM Knows What You are Looking for Before Generation"'


class SnapKVParams(BaseModel):
    """Parameters of the ``snapkv`` encode scorer."""

    model_config = ConfigDict(extra="forbid")

    window: int = Field(
        default=32,
        ge=1,
        le=1 << 16,
        description="observation window: the last prompt queries whose attention votes; "
        "these entries are always kept (authors' default 32)",
    )
    kernel_size: int = Field(
        default=5,
        ge=1,
        le=1025,
        description="width of the 1-D pooling over neighbouring keys, odd (authors' default 5)",
    )
    pooling: Literal["avg", "max"] = Field(default="avg", description="pooling of the votes (authors' default avg)")
    per_head: bool = Field(default=True, description="select per kv head (the paper); false: from the head-mean")
    protect_text: bool = Field(
        default=False, description="multimodal prompts: never evict TEXT entries, only image ones"
    )

    @field_validator("kernel_size")
    @classmethod
    def _odd(cls, v: int) -> int:
        if v % 2 == 0:
            raise ValueError("kernel_size must be odd (a centred window that keeps the sequence length)")
        return v


def pool_votes(view: LayerView, votes: torch.Tensor, candidates: torch.Tensor, kernel_size: int, pooling: str):
    """1-D pooling of ``votes`` ``[B, H', P]`` over positionally neighbouring entries.

    Entries are laid out in positional order first (slots are unordered in general). Non-candidates (invalid slots,
    the observation window) count as 0, which is the authors' zero padding at the prefix's ends: their pooling runs
    over the prefix ``attn[..., :-window]`` with ``padding=kernel_size // 2`` (``count_include_pad`` for avg; for max,
    votes are >= 0 so zeros never win over a real neighbour)."""
    order = view.order()
    if votes.shape[1] != order.shape[1]:
        order = order[:, :1]  # one decision per row: every head has the same layout here
        candidates = candidates[:, :1]
    v = torch.where(candidates, votes, 0.0).gather(-1, order)
    b, h, p = v.shape
    flat = v.reshape(b * h, 1, p)
    pad = kernel_size // 2
    if kernel_size > 1:
        if pooling == "avg":
            flat = F.avg_pool1d(flat, kernel_size, stride=1, padding=pad, count_include_pad=True)
        else:
            flat = F.max_pool1d(flat, kernel_size, stride=1, padding=pad)
    pooled = flat.reshape(b, h, p)
    out = torch.empty_like(pooled)
    out.scatter_(-1, order, pooled)
    return out


def snapkv_scores(view: LayerView, prm: SnapKVParams) -> torch.Tensor:
    """SnapKV's ranking, ``[B, H or 1, P]``: pooled window votes, ``+inf`` for the window (and text, if protected)."""
    votes = heads(check_attention(view, prm.window, "snapkv"), prm.per_head)
    window = recent(view, prm.window)
    candidates = view.valid & ~window
    pooled = pool_votes(view, votes, candidates, prm.kernel_size, prm.pooling)
    return protect_text(view, protect(view, pooled, window), prm.protect_text)


class SnapKVScorer:
    """SnapKV (``snapkv`` encode scorer).

    Li et al., NeurIPS 2024, "SnapKV: LLM Knows What You are Looking for Before Generation": the last ``window``
    prompt queries (the observation window) vote for the prefix entries they attend to: ``sum_{i in window}
    A[h, i, j]``, smoothed by a 1-D pooling of width ``kernel_size`` over neighbouring positions so that the clusters
    around important tokens survive; the best prefix entries are kept per head, plus the whole window.

    Deviations: votes are per kv head (with GQA: the mean of the group's query heads' votes; the authors' code
    votes per query head on repeated keys); the window is counted per row among real tokens (left padding excluded).
    Rows whose prompt is not longer than the budget are not compressed (the engine's rule), like the authors'
    ``q_len < max_capacity_prompt`` shortcut."""

    def __init__(self, params: SnapKVParams | None = None, **kwargs: Any):
        self.params = build(SnapKVScorer, SnapKVParams, params, kwargs)
        self.needs: frozenset[AttentionStat] = frozenset({AttentionStat(self.params.window)})

    def score(self, view: LayerView) -> torch.Tensor:
        return snapkv_scores(view, self.params)


@hookimpl
def kvpolicy_parts() -> list[PartSpec]:
    return [
        PartSpec(
            name="snapkv",
            kind="encode",
            params=SnapKVParams,
            factory=SnapKVScorer,
            summary="SnapKV: votes of the last `window` prompt queries, pooled over neighbours, per kv head",
            provides=frozenset({"scores", "per_head_scores"}),
        ),
    ]


@hookimpl
def kvpolicy_presets() -> list[PresetSpec]:
    return [
        PresetSpec(
            name="snapkv",
            summary="SnapKV (window 32, avg pooling 5) at prefill only, half of the prompt removed",
            policy={"encode": {"name": "snapkv"}, "reducer": {"name": "evict"}, "ratio": 0.5},
        ),
    ]
