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

The selection and merge machinery here (:func:`heavy_recent_select`, :func:`most_similar`, :func:`merge_kv`) is
shared with ``kvpolicy_plugins.d2o``. See ``docs/merging.md``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from kvpolicy.hookspecs import PartSpec, PresetSpec, hookimpl
from kvpolicy.policy import IMAGE, AttentionStat, LayerView, Reduction
from kvpolicy.selection import ranked_slots, sort_by_position

from .evict import (
    ATTENTION_SUM,
    INF,
    PROMPT_ATTENTION,
    STEP_ATTENTION,
    AttentionAccumulator,
    build,
    check_attention,
    heads,
)

PAPER = (
    'Wan et al., Findings of EMNLP 2024, "LOOK-M: Look-Once Optimization in KV Cache for Efficient Multimodal '
    'Long-Context Inference"'
)

#: bound on the float32 similarity block (elements) computed at once by :func:`most_similar`
SIM_CHUNK_ELEMENTS = 1 << 24

#: merge strategies: LOOK-M's three (and ``none`` = evict), plus D2O's similarity-softmax weights
Strategy = Literal["average", "pivotal", "weighted", "softmax", "none"]


# ===================================================================================================== helpers


def expand_scores(view: LayerView, scores: torch.Tensor, who: str) -> torch.Tensor:
    """``scores`` ``[B, H or 1, P]`` as float32 ``[B, H, P]``; NaN is an error, never silently ranked."""
    if scores.dim() != 3 or scores.shape[0] != view.batch_size or scores.shape[-1] != view.num_slots:
        raise ValueError(
            f"{who}: scores must be [B, H or 1, P] = [{view.batch_size}, {view.num_heads} or 1, {view.num_slots}], "
            f"got {tuple(scores.shape)}"
        )
    s = scores.to(device=view.keys.device, dtype=torch.float32)
    if torch.isnan(s).any():
        raise FloatingPointError(f"{who}: layer {view.layer_idx}: the scorer returned NaN")
    return s.expand(view.batch_size, view.num_heads, view.num_slots)


def keep_per_head(view: LayerView, keep: torch.Tensor) -> torch.Tensor:
    """``keep`` (int ``[B]`` or ``[B, H]``) as int64 ``[B, H]``, capped at the entries each row holds."""
    keep = keep.to(device=view.keys.device, dtype=torch.long)
    if keep.dim() == 1:
        keep = keep[:, None]
    return torch.minimum(keep.expand(view.batch_size, view.num_heads), view.held())


def recent_count(budget: torch.Tensor, recent: int | None, recent_share: float) -> torch.Tensor:
    """Size of the recent window for a row keeping ``budget`` entries: ``min(recent, budget)`` when a token count
    is given, else ``floor(recent_share * budget)`` (float64, as Python computes it)."""
    if recent is not None:
        return budget.clamp(max=recent)
    return torch.floor(budget.to(torch.float64) * float(recent_share)).to(torch.long).clamp(min=0)


def _top_within(view: LayerView, scores: torch.Tensor, pool: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """bool ``[B, H, P]``: the ``count[b, h]`` best-scored slots of ``pool`` (ties to the older position)."""
    best = ranked_slots(dataclasses.replace(view, valid=pool), scores)  # pool first, best first
    first = torch.arange(view.num_slots, device=scores.device) < count[..., None]
    return torch.zeros_like(pool).scatter_(-1, best, first) & pool


def heavy_recent_select(
    view: LayerView,
    scores: torch.Tensor,
    keep: torch.Tensor,
    *,
    start_size: int = 0,
    recent: int | None = None,
    recent_share: float = 0.5,
    text_prior: bool = False,
    image_share: float | None = None,
    who: str = "heavy_recent_select",
) -> torch.Tensor:
    """Which entries survive, bool ``[B, H, P]`` (exactly ``min(keep, held)`` per row and kv head).

    Per row and head, with ``k = min(keep, held)``:

    1. the newest ``r`` entries (the recent window: ``recent`` tokens, or ``floor(recent_share * k)``);
    2. the oldest ``s = min(start_size, k - r)`` entries (sinks);
    3. ``h = k - r - s`` *heavy* entries among the others, by score (ties to the older position):

       * no priority (``text_prior`` off, no ``image_share``): the ``h`` best;
       * ``text_prior``: every non-image entry ranks above every image entry (each class by score);
       * ``image_share`` ``φ``: image entries get ``floor(φ k)`` of the row's ``k`` entries (those already in the
         window or the sinks count), clipped to ``[0, h]`` and to the image candidates; text takes the rest of
         ``h``; whatever one modality cannot fill goes to the other.
    """
    s = expand_scores(view, scores, who)
    valid = view.valid
    held = view.held()
    k = keep_per_head(view, keep)
    rank = view.rank()
    r = recent_count(k, recent, recent_share)
    in_recent = valid & (rank >= (held - r)[..., None])
    n_sink = (k - r).clamp(min=0).clamp(max=start_size)
    sink = valid & (rank < n_sink[..., None])
    cand = valid & ~in_recent & ~sink
    h = (k - r - n_sink).clamp(min=0)
    if image_share is None and not text_prior:
        heavy = _top_within(view, s, cand, h)
    else:
        is_img = view.token_types == IMAGE
        c_txt, c_img = cand & ~is_img, cand & is_img
        n_txt, n_img = c_txt.sum(-1), c_img.sum(-1)
        if image_share is None:
            q_txt = torch.minimum(n_txt, h)
            q_img = torch.minimum(n_img, h - q_txt)
        else:
            i0 = ((sink | in_recent) & is_img).sum(-1)
            quota = torch.floor(k.to(torch.float64) * float(image_share)).to(torch.long) - i0
            q_img = torch.minimum(quota.clamp(min=0), h)
            q_img = torch.minimum(q_img, n_img)
            q_txt = torch.minimum(n_txt, h - q_img)
            q_img = torch.minimum(n_img, h - q_txt)
        heavy = _top_within(view, s, c_txt, q_txt) | _top_within(view, s, c_img, q_img)
    return sink | in_recent | heavy


def most_similar(
    view: LayerView, targets: torch.Tensor, sources: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For every ``sources`` slot, the ``targets`` slot of the same row and kv head whose key has the highest cosine
    similarity (ties to the older position), and that similarity.

    Returns (target slot int64 ``[B, H, P]``, similarity float32 ``[B, H, P]`` (0 where not a source), has a
    target bool ``[B, H]``). Keys are normalised in float32 (``F.normalize``, eps 1e-12). Only the source rows are
    compared (one row per decode victim), in chunks of at most ``SIM_CHUNK_ELEMENTS`` similarities."""
    b, h, p, d = view.keys.shape
    dev = view.keys.device
    order = view.order()
    k_sorted = F.normalize(view.keys.gather(2, order[..., None].expand(b, h, p, d)).to(torch.float32), dim=-1)
    tgt_sorted = targets.gather(-1, order)
    n_src = sources.sum(-1)
    s_max = int(n_src.max()) if n_src.numel() else 0
    target = torch.zeros(b, h, p, dtype=torch.long, device=dev)
    best = torch.zeros(b, h, p, dtype=torch.float32, device=dev)
    if s_max > 0:
        src_idx = (~sources).to(torch.int8).argsort(dim=-1, stable=True)[..., :s_max]  # source slots first
        q = F.normalize(view.keys.gather(2, src_idx[..., None].expand(b, h, s_max, d)).to(torch.float32), dim=-1)
        choice = torch.zeros(b, h, s_max, dtype=torch.long, device=dev)
        val = torch.zeros(b, h, s_max, dtype=torch.float32, device=dev)
        rows = max(1, SIM_CHUNK_ELEMENTS // max(1, b * h * p))
        for i0 in range(0, s_max, rows):
            i1 = min(s_max, i0 + rows)
            sim = torch.matmul(q[:, :, i0:i1], k_sorted.transpose(2, 3))  # [B, H, c, P]
            sim.masked_fill_(~tgt_sorted[:, :, None, :], float("-inf"))
            val[:, :, i0:i1], choice[:, :, i0:i1] = sim.max(dim=-1)  # first maximum = oldest (positional layout)
        # src_idx is a permutation prefix: distinct slots, so the scatters never collide
        target.scatter_(-1, src_idx, order.gather(-1, choice))
        best.scatter_(-1, src_idx, val)
    has = targets.any(-1)
    sim = torch.where(sources & has[..., None], best, 0.0)
    return target, sim, has


def row_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over the ``mask`` entries of each batch row (all kv heads), float64 ``[B]``; NaN where a
    row has none."""
    v = torch.where(mask, values.to(torch.float64), 0.0).sum(dim=(1, 2))
    n = mask.sum(dim=(1, 2)).to(torch.float64)
    return torch.where(n > 0, v / n.clamp(min=1), float("nan"))


def merge_kv(
    view: LayerView,
    sources: torch.Tensor,
    target: torch.Tensor,
    sim: torch.Tensor,
    strategy: str,
    merge_keys: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Full keys and values ``[B, H, P, D]`` after merging every ``sources`` slot into its ``target`` slot.

    For a target ``c`` receiving sources ``e_1..e_n`` with similarities ``u_i`` (``x`` = key or value):

    * ``average``: ``(x_c + sum x_e) / (1 + n)``;
    * ``pivotal``: ``(x_c + sum (x_e + x_c) / 2) / (1 + n)`` (each source is first averaged with its pivot);
    * ``weighted``: ``(x_c + sum u_e x_e) / (1 + n)``;
    * ``softmax``: ``(e x_c + sum exp(u_e) x_e) / (e + sum exp(u_e))`` — a softmax over the cosine similarities to
      ``c`` of ``c`` itself (similarity 1, weight ``e``) and its sources (D2O).

    Computed in float64, cast back once; targets receiving nothing (and every other slot) are returned unchanged."""
    f64 = torch.float64
    src = sources
    t = torch.where(src, target, 0)
    u = sim.to(f64)
    one = torch.ones_like(u)
    if strategy == "average":
        w = one
    elif strategy == "pivotal":
        w = one * 0.5
    elif strategy == "weighted":
        w = u
    elif strategy == "softmax":
        w = torch.exp(u)
    else:
        raise ValueError(f"unknown merge strategy {strategy!r}")
    w = torch.where(src, w, 0.0)
    n = torch.zeros_like(u).scatter_add_(-1, t, src.to(f64))
    sw = torch.zeros_like(u).scatter_add_(-1, t, w)
    received = n > 0
    if strategy == "pivotal":
        a, denom = 1.0 + n / 2.0, 1.0 + n
    elif strategy == "softmax":
        a, denom = torch.full_like(n, math.e), math.e + sw
    else:
        a, denom = one, 1.0 + n

    def merged(x: torch.Tensor) -> torch.Tensor:
        x64 = x.to(f64)
        acc = x64 * a[..., None]
        contrib = torch.where(src[..., None], x64 * w[..., None], 0.0)
        acc.scatter_add_(2, t[..., None].expand_as(x64), contrib)
        out = acc / denom[..., None]
        return torch.where(received[..., None], out, x64).to(x.dtype)

    keys = merged(view.keys) if merge_keys else view.keys
    return keys, merged(view.values)


def reduction_from_mask(view: LayerView, kept: torch.Tensor, keys=None, values=None) -> Reduction:
    """A :class:`Reduction` keeping the ``kept`` slots in positional order (``keys``/``values``: full merged
    tensors to gather from, or ``None`` to evict)."""
    order = view.order()
    n_kept = kept.sum(-1)
    k_max = int(n_kept.max()) if n_kept.numel() else 0
    first = (~kept.gather(-1, order)).to(torch.int8).argsort(dim=-1, stable=True)
    index = order.gather(-1, first)[..., :k_max]
    ok = torch.arange(k_max, device=kept.device) < n_kept[..., None]
    red = sort_by_position(view, index, ok)
    if keys is not None:
        red.keys = keys.gather(2, red.index[..., None].expand(*red.index.shape, keys.shape[-1]))
    if values is not None:
        red.values = values.gather(2, red.index[..., None].expand(*red.index.shape, values.shape[-1]))
    return red


# ===================================================================================================== parameters


class AccumulatedParams(BaseModel):
    """Parameters of the ``lookm`` and ``d2o`` encode scorers."""

    model_config = ConfigDict(extra="forbid")

    per_head: bool = Field(
        default=True,
        description="score per kv head (the authors' code keeps one score row per head); false: mean over heads",
    )


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
    image_share: float | None = Field(
        default=None,
        ge=0.0,
        le=1.0,
        description="split budget: image entries get floor(image_share * budget) of the entries kept (window and "
        "sinks included), text the rest; unused share goes to the other modality. null: text_prior decides",
    )
    recent_share: float = Field(
        default=0.5,
        ge=0.0,
        le=1.0,
        description="recent window as a share of the budget: the newest floor(recent_share * budget) entries are "
        "kept (the authors run heavy 10% + recent 10% of the prompt: 0.5)",
    )
    recent: int | None = Field(
        default=None, ge=0, le=1 << 20, description="recent window in tokens (overrides recent_share); null: use the share"
    )
    start_size: int = Field(
        default=0,
        ge=0,
        le=1 << 20,
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


class HeavyRecentDecodeParams(BaseModel):
    """Parameters of the ``lookm`` decode scorer."""

    model_config = ConfigDict(extra="forbid")

    text_prior: bool = Field(
        default=True, description="drop image entries first (lowest score), text and generated entries only after"
    )
    recent_share: float = Field(
        default=0.5,
        ge=0.0,
        le=1.0,
        description="recent window as a share of the layer's budget (entries held after prefill), never dropped",
    )
    recent: int | None = Field(
        default=None, ge=0, le=1 << 20, description="recent window in tokens (overrides recent_share)"
    )
    start_size: int = Field(default=0, ge=0, le=1 << 20, description="oldest entries never dropped (sinks)")
    per_head: bool = Field(default=True, description="accumulate and decide per kv head; false: mean over heads")


# ===================================================================================================== encode


class AccumulatedAttention:
    """Accumulated attention at prefill (``lookm`` / ``d2o`` encode scorer).

    LOOK-M (Wan et al., Findings of EMNLP 2024) and D2O (Wan et al., 2024) both rank the prompt's entries by the
    attention they received, H2O's statistic: ``score[h, j] = sum_i A[h, i, j]`` over every prompt query ``i``
    (``AttentionStat(None)``; causal softmax, with GQA averaged over the query heads of kv head ``h``), per kv head
    (``per_head``, as the authors' code keeps ``attn.sum(0).sum(1)`` per head) or averaged over heads. No recent
    window here: the ``lookm`` / ``d2o`` reducers add it as a share of the budget.

    Deviation: the authors' code sums over the batch dimension too (batch 1 in their runs); kvpolicy scores each
    row separately. Their heads are query heads on repeated keys; kvpolicy's are kv heads."""

    def __init__(self, params: AccumulatedParams | None = None, **kwargs: Any):
        self.params = build(AccumulatedAttention, AccumulatedParams, params, kwargs)
        self.needs: frozenset[AttentionStat] = frozenset({PROMPT_ATTENTION})
        self.provides = frozenset({"scores", "per_head_scores"} if self.params.per_head else {"scores"})

    def score(self, view: LayerView) -> torch.Tensor:
        att = check_attention(view, None, "accumulated attention")
        return heads(torch.where(view.valid, att, 0.0), self.params.per_head)


# ===================================================================================================== decode


class HeavyRecentDecode(AttentionAccumulator):
    """LOOK-M while decoding (``lookm`` decode scorer): accumulated attention with sinks, a recent window sized from
    the budget, and the text prior. ``d2o`` uses the same rule with D2O's defaults.

    Wan et al., Findings of EMNLP 2024, "LOOK-M": the authors' code re-runs its text-prior heavy-hitter + recent
    selection at every decode step, keeping the cache at its prefill size.

    The accumulator is H2O's (seeded from the prompt's column sums, ``prefill_needs = {AttentionStat(None)}``, and
    increased by every step's attention row, ``AttentionStat(1)``, kept per slot by the engine as
    ``slot_state['attention_sum']``). When the budget rule asks for a drop, the sinks (``start_size`` oldest) and the
    recent window (``recent`` tokens, or ``floor(recent_share * prefill_kept)``, the newest entries, the new token
    included) are never dropped; among the rest the lowest accumulated score goes — with ``text_prior``, image entries
    before any text or generated entry (an image entry is dropped while one is left outside the window).

    This is what the LOOK-M and D2O codes do at each decode step (their per-step compression evicts the entry the
    heavy-hitter + recent rule leaves out; the merge is the reducer's ``on_drop``). The text prior is encoded as
    ``score + max_row_score + 1`` for non-image entries, which is exact in ordering between classes; inside the text
    class float32 rounding may turn near-equal scores into ties (resolved to the older entry)."""

    def __init__(self, params: HeavyRecentDecodeParams | None = None, **kwargs: Any):
        params_cls = getattr(type(self), "params_model", HeavyRecentDecodeParams)
        self.params = build(type(self), params_cls, params, kwargs)
        self.needs: frozenset[AttentionStat] = frozenset({STEP_ATTENTION})
        self.prefill_needs: frozenset[AttentionStat] = frozenset({PROMPT_ATTENTION})
        self.accumulate_per_head = self.params.per_head

    def drop_scores(self, view: LayerView) -> torch.Tensor:
        prm = self.params
        acc = view.slot_state.get(ATTENTION_SUM)
        if acc is None:
            raise RuntimeError(f"{type(self).__name__}: no accumulated attention (init_state was not called at prefill)")
        acc = acc.to(torch.float32).expand(view.batch_size, view.num_heads, view.num_slots)
        valid = view.valid
        held = view.held()
        budget = view.prefill_kept if view.prefill_kept is not None else held
        budget = budget.to(held.device).expand_as(held)
        rank = view.rank()
        r = recent_count(budget, prm.recent, prm.recent_share)
        protected = valid & ((rank < prm.start_size) | (rank >= (held - r)[..., None]))
        scores = acc.clone()
        if prm.text_prior:
            top = torch.where(valid, acc, float("-inf")).amax(-1, keepdim=True).clamp(min=0.0)
            scores = torch.where(view.token_types == IMAGE, acc, acc + top + 1.0)
        return scores.masked_fill(protected, INF)


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
        if merged is None:
            return reduction_from_mask(view, kept)
        return reduction_from_mask(view, kept, *merged)

    def on_drop(
        self, view: LayerView, victims: torch.Tensor, victim_valid: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.params.merge == "none" or not self.params.decode_merge:
            return None
        drop = torch.zeros_like(view.valid).scatter_(-1, victims, victim_valid) & view.valid
        if not bool(drop.any()):
            return None
        return self._merge(view, drop, view.valid & ~drop)


# ===================================================================================================== registration


@hookimpl
def kvpolicy_parts() -> list[PartSpec]:
    return [
        PartSpec(
            name="lookm",
            kind="encode",
            params=AccumulatedParams,
            factory=AccumulatedAttention,
            summary="LOOK-M: attention accumulated from every prompt query, per kv head (no window: the reducer's)",
            provides=frozenset({"scores", "per_head_scores"}),
        ),
        PartSpec(
            name="lookm",
            kind="decode",
            params=HeavyRecentDecodeParams,
            factory=HeavyRecentDecode,
            summary="LOOK-M: accumulated attention; drop image entries first, never the recent window",
            provides=frozenset({"scores", "per_head_scores", "cumulative_attention"}),
        ),
        PartSpec(
            name="lookm",
            kind="reducer",
            params=LookMParams,
            factory=LookMReducer,
            summary="LOOK-M: recent window + text-prior heavy hitters; evicted entries merged into the most similar "
            "kept one (average / pivotal / weighted)",
            provides=frozenset(),
            requires=frozenset({"scores"}),
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
