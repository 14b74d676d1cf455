"""LOOK-M: text-prior eviction for multimodal prompts, evicted entries merged into their most similar kept entry.

Wan et al., Findings of EMNLP 2024, "LOOK-M: Look-Once Optimization in KV Cache for Efficient Multimodal
Long-Context Inference" (arXiv 2406.18139; authors' code github.com/SUSTechBruce/LOOK-M, commit ecf0f51,
``LLaVA-mix_merge_v1/llava/model/kv_token_merge/modify_llama.py``: ``TextPivotMerge_LayerWise``,
``TextWeightedMerge_LayerWise``, ``TextAVGMergeKVCache_LayerWise``).

* ``lookm`` (encode scorer): the attention each prompt entry received from every prompt query (column sums of the
  causal softmax, ``AttentionStat(None)``), per kv head — LOOK-M's (H2O's) accumulated score;
* ``lookm`` (reducer): keep a recent window (a share of the budget), then *text first*: the prompt's text entries
  are ranked above every image entry, each modality by score (or a fixed ``image_share`` of the budget for image
  entries); every evicted entry is merged into the kept entry whose key is most similar (cosine, same kv head) with
  the ``average``, ``pivotal`` or ``weighted`` strategy. Decode-time victims are merged the same way (``on_drop``);
* ``lookm`` (decode scorer): the accumulated attention kept up to date at every step; once the cache is over budget
  the lowest-scored *image* entry outside the recent window goes first (text prior), then text / generated ones;
* preset ``lookm``: the authors' evaluation setting (text prior + pivotal merge, heavy 10% + recent 10% of the
  prompt, i.e. ``ratio: 0.8``, fixed budget while decoding).

The selection and merge machinery (:func:`~kvpolicy.parts.heavy_recent_select`, :func:`~kvpolicy.parts.most_similar`,
:func:`~kvpolicy.parts.merge_kv`) and the encode and decode scorers are shared with ``kvpolicy_plugins.d2o`` through
:mod:`kvpolicy.parts`. See ``docs/merging.md``.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from kvpolicy.hookspecs import PartSpec, PresetSpec, hookimpl
from kvpolicy.parts import (
    HeavyRecentDecode,
    HeavyRecentDecodeParams,
    Share,
    Tokens,
    accumulated_specs,
    build,
    consumer_spec,
    heavy_recent_select,
    merge_kv,
    most_similar,
    reduction_from_mask,
    row_mean,
    victim_mask,
)
from kvpolicy.core.policy import LayerView, Reduction

PAPER = (
    'Wan et al., Findings of EMNLP 2024, "LOOK-M: Look-Once Optimization in KV Cache for Efficient Multimodal '
    'Long-Context Inference"'
)


# ===================================================================================================== parameters


class LookMParams(BaseModel):
    """Parameters of the ``lookm`` reducer."""

    model_config = ConfigDict(extra="forbid")

    merge: Literal["average", "pivotal", "weighted", "none"] = Field(
        default="pivotal",
        description="how an evicted entry joins its most similar kept entry: average, pivotal (the authors' main "
        "setting), weighted (by cosine similarity), none (text-prior eviction only)",
    )
    text_prior: bool = Field(
        default=True,
        description="rank every text (non-image) entry above every image entry, each modality by score (the paper's "
        "text-prior eviction); ignored when image_share is set",
    )
    image_share: Share | None = Field(
        default=None,
        description="split budget: image entries get floor(image_share * budget) of the entries kept (window and "
        "sinks included), text the rest; unused share goes to the other modality. null: text_prior decides",
    )
    recent_share: Share = Field(
        default=0.5,
        description="recent window as a share of the budget: the newest floor(recent_share * budget) entries are "
        "kept (the authors run heavy 10% + recent 10% of the prompt: 0.5)",
    )
    recent: Tokens | None = Field(
        default=None, description="recent window in tokens (overrides recent_share); null: use the share"
    )
    start_size: Tokens = Field(
        default=0,
        description="oldest entries always kept (sinks); the authors' text-prior variants use none, their plain "
        "merge variants 4",
    )
    decode_merge: bool = Field(
        default=True,
        description="while decoding, merge each entry the decode scorer drops into its most similar survivor with "
        "the same strategy (the authors' code re-runs its compression every step); false: evict",
    )
    quirk_mean_filter: bool = Field(
        default=False,
        description="authors' code (weighted/average variants): merge only the evicted entries whose best similarity "
        "is at least the mean best similarity of the row's evicted entries (all kv heads); the others are dropped",
    )


# ===================================================================================================== reducer


class LookMReducer:
    """LOOK-M's compression (``lookm`` reducer).

    Wan et al., Findings of EMNLP 2024, "LOOK-M: Look-Once Optimization in KV Cache for Efficient Multimodal
    Long-Context Inference": at prefill the model attends to text far more than to image features, so LOOK-M evicts
    with a **text prior** (text entries are kept before image entries) and compensates the loss of image context by
    **merging** every evicted entry into the kept entry whose key is most similar.

    Our reading of the method (paper Sec. 3; where the paper is not explicit, the authors' code decides):

    1. **Selection** (:func:`heavy_recent_select`), per row and kv head, with ``k`` = the budget: the recent window
       (``floor(recent_share * k)`` newest entries; the authors' scripts use heavy 10% + recent 10% of the prompt,
       i.e. ``recent_share = 0.5``), optional sinks, and the heavy entries by the encode scorer's score (the
       ``lookm`` scorer: accumulated attention) with every text entry ranked above every image entry (the code adds
       ``-65516`` to the image positions' scores, the paper raises the text entries' scores: the same order).
       ``image_share`` replaces the text prior by a fixed split (an option of kvpolicy, not in the paper).
    2. **Merge target**: for each evicted entry, the kept entry (any kind: window, text, image) of the same kv head
       with the highest key cosine similarity (ties to the older entry).
    3. **Strategies** (for keys and values alike, with the similarity computed on keys), for a kept entry ``c``
       receiving ``e_1..e_n`` with similarities ``u_i`` — the code's ``scatter_reduce(mean, include_self=True)``:

       * ``average``: ``(x_c + sum x_e) / (1 + n)``;
       * ``pivotal``: the kept entry is the pivot: each source is first averaged with it, ``(x_c + sum (x_e + x_c)
         / 2) / (1 + n)`` (``(3 x_c + x_e) / 4`` for one source);
       * ``weighted``: sources scaled by their similarity, ``(x_c + sum u_e x_e) / (1 + n)``.

    4. **Decode**: with a decode scorer (the ``lookm`` one: text prior, recent window kept), each entry dropped is
       merged into its most similar survivor with the same strategy (``on_drop``; ``decode_merge: false`` evicts).

    Pads are never kept, merged or merge targets; rows whose budget covers them are untouched.

    Deviations from the authors' code: (a) the code also sums scores over the batch and runs batch 1; kvpolicy
    decides per row; (b) GQA: similarities and merges per kv head (the code works on query heads with repeated kv);
    (c) ``quirk_mean_filter`` (off): the weighted and average variants of the code merge only the evicted entries
    whose head-averaged best similarity is at least the mean (kvpolicy: each entry's own similarity against the mean
    over the row's evicted entries of all heads; the code's average variant then pairs the filtered targets with the
    first unfiltered sources, a bug not reproduced); (d) the code caches keys before RoPE and re-rotates them by cache
    index, kvpolicy keeps logical positions; (e) the code's text variants keep ``score >= 0`` after penalising image
    scores, i.e. *every* text entry whatever the budget (its cache exceeds ``hh + recent`` when the text outside the
    window exceeds ``hh``); a reducer must respect the budget, so kvpolicy ranks text first within it; (f) those
    variants do not compact their score vector after a compression, so at decode time it no longer lines up with
    the cache — kvpolicy keeps scores aligned. See ``docs/merging.md``.
    """

    def __init__(self, params: LookMParams | None = None, **kwargs: Any):
        self.params = build(LookMReducer, LookMParams, params, kwargs)

    def select(self, view: LayerView, scores: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        prm = self.params
        return heavy_recent_select(
            view,
            scores,
            keep,
            start_size=prm.start_size,
            recent=prm.recent,
            recent_share=prm.recent_share,
            text_prior=prm.text_prior,
            image_share=prm.image_share,
            who="lookm",
        )

    def _filter(self, view: LayerView, sources: torch.Tensor, sim: torch.Tensor) -> torch.Tensor:
        if not self.params.quirk_mean_filter:
            return sources
        m = row_mean(sim, sources).to(sim.device)
        return sources & (sim.to(torch.float64) >= m[:, None, None])

    def _merge(self, view: LayerView, sources: torch.Tensor, targets: torch.Tensor):
        target, sim, has = most_similar(view, targets, sources)
        sources = self._filter(view, sources & has[..., None], sim)
        if not bool(sources.any()):
            return None
        return merge_kv(view, sources, target, sim, self.params.merge)

    def reduce(self, view: LayerView, scores: torch.Tensor, keep: torch.Tensor) -> Reduction:
        kept = self.select(view, scores, keep)
        evicted = view.valid & ~kept
        merged = None
        if self.params.merge != "none" and bool(evicted.any()):
            merged = self._merge(view, evicted, kept)
        return reduction_from_mask(view, kept, *(merged or (None, None)))

    def on_drop(
        self, view: LayerView, victims: torch.Tensor, victim_valid: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.params.merge == "none" or not self.params.decode_merge:
            return None
        drop = victim_mask(view, victims, victim_valid)
        if not bool(drop.any()):
            return None
        return self._merge(view, drop, view.valid & ~drop)


# ===================================================================================================== registration


@hookimpl
def kvpolicy_parts() -> list[PartSpec]:
    return [
        *accumulated_specs(
            "lookm",
            encode_summary="LOOK-M: attention accumulated from every prompt query, per kv head "
            "(no window: the reducer's)",
            decode_params=HeavyRecentDecodeParams,
            decode_factory=HeavyRecentDecode,
            decode_summary="LOOK-M: accumulated attention; drop image entries first, never the recent window",
        ),
        consumer_spec(
            name="lookm",
            kind="reducer",
            params=LookMParams,
            factory=LookMReducer,
            summary="LOOK-M: recent window + text-prior heavy hitters; evicted entries merged into the most similar "
            "kept one (average / pivotal / weighted)",
        ),
    ]


#: the authors' evaluation setting: text prior + pivotal merge, heavy 10% + recent 10% of the prompt (HH_R = RECENT_R
#: = 0.1 in scripts/text-prior-pivot-merge_eval.sh), the cache held at that size while decoding
LOOKM_POLICY: dict[str, Any] = {
    "encode": {"name": "lookm"},
    "decode": {"name": "lookm"},
    "reducer": {"name": "lookm", "merge": "pivotal"},
    "ratio": 0.8,
    "decode_budget": "fixed",
}


@hookimpl
def kvpolicy_presets() -> list[PresetSpec]:
    return [
        PresetSpec(
            name="lookm",
            summary="LOOK-M: text-prior eviction + pivotal merge into the most similar kept entry, 20% kept "
            "(half recent window), fixed while decoding",
            policy=LOOKM_POLICY,
        ),
    ]
