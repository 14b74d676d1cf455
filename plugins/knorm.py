"""Knorm: keep the keys with the lowest L2 norm.

Devoto et al., EMNLP 2024, "A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression"
(arXiv 2406.11430).

* ``knorm`` (encode scorer): ``-||k_j||_2`` per kv head (default) or averaged over heads: low-norm keys draw high
  attention, so they are kept. No attention statistic is needed (works with flash / SDPA attention as is);
* ``knorm`` (decode scorer): the same rule over the cache, dropping the highest-norm entry;
* preset ``knorm`` (prefill only, ratio 0.5).
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from kvpolicy.hookspecs import PartSpec, PresetSpec, hookimpl
from kvpolicy.parts import build, heads, protect_text
from kvpolicy.core.policy import AttentionStat, LayerView

PAPER = 'Devoto et al., EMNLP 2024, "A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression"'


class KnormParams(BaseModel):
    """Parameters of the ``knorm`` encode and decode scorers."""

    model_config = ConfigDict(extra="forbid")

    per_head: bool = Field(
        default=True, description="rank per kv head (the paper); false: one ranking from the norm averaged over heads"
    )
    protect_text: bool = Field(
        default=False, description="multimodal prompts: never evict TEXT entries, only image (and generated) ones"
    )


def _knorm_scores(view: LayerView, prm: KnormParams) -> torch.Tensor:
    norm = view.keys.to(torch.float32).norm(dim=-1)  # [B, H, P]; RoPE is a rotation: same norm before or after it
    return protect_text(view, heads(-norm, prm.per_head), prm.protect_text)


class KnormScorer:
    """Knorm at prefill (``knorm`` encode scorer).

    Devoto et al., EMNLP 2024, "A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression": the L2 norm
    of a cached key is strongly and negatively correlated with the attention it receives, so keeping the keys with
    the *lowest* norm approximates attention-based eviction without computing attention. Score: ``-||k||_2`` per kv
    head (``per_head=True``) or its mean over heads.

    Keys are cached after RoPE; RoPE rotates pairs of dimensions, so the norm is the same as before it. The paper
    reports the norm/attention pattern holds across *most* layers; kvpolicy compresses every layer alike (no
    per-layer exceptions are built in). With GQA the norm is naturally per kv head (keys are stored per kv head)."""

    needs: frozenset[AttentionStat] = frozenset()

    def __init__(self, params: KnormParams | None = None, **kwargs: Any):
        self.params = build(KnormScorer, KnormParams, params, kwargs)

    def score(self, view: LayerView) -> torch.Tensor:
        return _knorm_scores(view, self.params)


class KnormDecode:
    """Knorm while decoding (``knorm`` decode scorer): whenever the budget rule asks for a drop, the entry with the
    highest key norm goes (no attention needed: the drop happens inside the cache update)."""

    needs: frozenset[AttentionStat] = frozenset()

    def __init__(self, params: KnormParams | None = None, **kwargs: Any):
        self.params = build(KnormDecode, KnormParams, params, kwargs)

    def drop_scores(self, view: LayerView) -> torch.Tensor:
        return _knorm_scores(view, self.params)


@hookimpl
def kvpolicy_parts() -> list[PartSpec]:
    return [
        PartSpec(
            name="knorm",
            kind="encode",
            params=KnormParams,
            factory=KnormScorer,
            summary="Knorm: keep the keys with the lowest L2 norm (no attention needed)",
            provides=frozenset({"scores", "per_head_scores"}),
        ),
        PartSpec(
            name="knorm",
            kind="decode",
            params=KnormParams,
            factory=KnormDecode,
            summary="Knorm: drop the entry with the highest key norm",
            provides=frozenset({"scores", "per_head_scores"}),
        ),
    ]


@hookimpl
def kvpolicy_presets() -> list[PresetSpec]:
    return [
        PresetSpec(
            name="knorm",
            summary="Knorm: keep the lowest-norm keys per kv head at prefill, half of the prompt removed",
            policy={"encode": {"name": "knorm"}, "reducer": {"name": "evict"}, "ratio": 0.5},
        ),
    ]
