"""KeyDiff: keep the keys least similar to the mean key (attention-free).

Park et al., 2025, "KeyDiff: Key Similarity-Based KV Cache Eviction for Long-Context LLM Inference in
Resource-Constrained Environments" (arXiv 2504.15364; kvpress's ``KeyDiffPress``).

* ``keydiff`` (encode scorer): ``-cos(k_j, anchor)`` per kv head, where ``anchor`` is the mean of the row's
  L2-normalised keys (pads and freed slots never count in it); the policy's sinks (``view.sinks``) score ``+inf``.
  No attention statistic is needed, so it works with SDPA / flash attention as is;
* ``keydiff`` (decode scorer): the same rule over the current cache, dropping the key closest to the cache's anchor
  (the paper keeps its cache at the budget while generating);
* preset ``keydiff`` (prefill only, ratio 0.5), as kvpress runs it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from kvpolicy.core.policy import AttentionStat, LayerView
from kvpolicy.hookspecs import PartSpec, PresetSpec, hookimpl
from kvpolicy.parts import build, heads, protect, protect_text

PAPER = (
    'Park et al., 2025, "KeyDiff: Key Similarity-Based KV Cache Eviction for Long-Context LLM Inference in '
    'Resource-Constrained Environments"'
)


class KeyDiffParams(BaseModel):
    """Parameters of the ``keydiff`` encode and decode scorers."""

    model_config = ConfigDict(extra="forbid")

    per_head: bool = Field(
        default=True,
        description="rank per kv head (the paper and kvpress); false: one ranking from the score averaged over heads",
    )
    protect_text: bool = Field(
        default=False, description="multimodal prompts: never evict TEXT entries, only image (and generated) ones"
    )


def keydiff_scores(view: LayerView, prm: KeyDiffParams) -> torch.Tensor:
    """float32 ``[B, H or 1, P]``: ``-cos(k_j, mean_i k_i / ||k_i||)`` over the valid entries ``i`` of each row and
    kv head, ``+inf`` for the policy's sinks (and the prompt's TEXT entries with ``protect_text``).

    Why float32 and a masked mean: the anchor must not move with the row's left padding or freed slots (kvpress's
    batch-1 rows have none), and a half-precision cosine would tie distinct keys."""
    keys = view.keys.to(torch.float32)
    valid = view.valid[..., None]
    unit = torch.where(valid, F.normalize(keys, p=2, dim=-1), 0.0)
    count = view.valid.sum(-1, keepdim=True).clamp(min=1).to(torch.float32)  # [B, H, 1]
    anchor = unit.sum(dim=2, keepdim=True) / count[..., None]  # [B, H, 1, D]
    score = -F.cosine_similarity(keys, anchor, dim=-1)  # [B, H, P]; RoPE'd keys, as kvpress scores them
    score = protect(view, heads(score.masked_fill(~view.valid, 0.0), prm.per_head), view.sink_mask())
    return protect_text(view, score, prm.protect_text)


class KeyDiffScorer:
    """KeyDiff at prefill (``keydiff`` encode scorer).

    Park et al., 2025, "KeyDiff": keys that are geometrically distinctive (low cosine similarity to the other cached
    keys) draw high attention, so keeping the least similar keys approximates attention-based eviction without
    computing attention. The pairwise objective is relaxed to the similarity to one *anchor*, the mean of the
    normalised keys: score ``-cos(k_j, anchor)``, computed per kv head (keys are stored per kv head, so GQA needs
    nothing special) over the row's valid entries only. The policy's sinks (``view.sinks``) are never evicted.

    Deviation: the paper processes a long prompt block by block under a fixed cache size, evicting after each block
    with the anchor of what is cached at that time; kvpolicy (like kvpress) scores the whole prompt once after
    prefill, so the anchor is the mean over every prompt key (see docs/baselines.md)."""

    needs: frozenset[AttentionStat] = frozenset()

    def __init__(self, params: KeyDiffParams | None = None, **kwargs: Any):
        self.params = build(KeyDiffScorer, KeyDiffParams, params, kwargs)

    def score(self, view: LayerView) -> torch.Tensor:
        return keydiff_scores(view, self.params)


class KeyDiffDecode:
    """KeyDiff while decoding (``keydiff`` decode scorer): whenever the budget rule asks for a drop, the cached key
    most similar to the current cache's anchor goes (the anchor is recomputed from the entries held now, as the paper
    recomputes it at every eviction). No attention is needed: the drop happens inside the cache update."""

    needs: frozenset[AttentionStat] = frozenset()

    def __init__(self, params: KeyDiffParams | None = None, **kwargs: Any):
        self.params = build(KeyDiffDecode, KeyDiffParams, params, kwargs)

    def drop_scores(self, view: LayerView) -> torch.Tensor:
        return keydiff_scores(view, self.params)


@hookimpl
def kvpolicy_parts() -> list[PartSpec]:
    return [
        PartSpec(
            name="keydiff",
            kind="encode",
            params=KeyDiffParams,
            factory=KeyDiffScorer,
            summary="KeyDiff: keep the keys least similar (cosine) to the mean normalised key (no attention needed)",
            provides=frozenset({"scores", "per_head_scores"}),
        ),
        PartSpec(
            name="keydiff",
            kind="decode",
            params=KeyDiffParams,
            factory=KeyDiffDecode,
            summary="KeyDiff: drop the key most similar to the cache's mean normalised key",
            provides=frozenset({"scores", "per_head_scores"}),
        ),
    ]


@hookimpl
def kvpolicy_presets() -> list[PresetSpec]:
    return [
        PresetSpec(
            name="keydiff",
            summary="KeyDiff: keep the keys least similar to the mean key, per kv head, at prefill, half removed",
            policy={"encode": {"name": "keydiff"}, "reducer": {"name": "evict"}, "ratio": 0.5},
        ),
    ]
