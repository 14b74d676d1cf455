"""Elastic Cache: frequency scoring, anchor merging at prefill, distance-offset dropping while decoding.

Liu et al., ECCV 2024, "Efficient Inference of Vision Instruction-Following Models with Elastic Cache"
(authors' code: github.com/liuzuyan/ElasticCache, commit 3138e03, ``kv_cache.py: ElasticCache``).

Three parts and two presets:

* ``frequency`` (encode scorer): the attention each prompt entry *receives* from every prompt query during prefill,
  heads averaged (``score[j] = sum_i mean_h A[h, i, j]``);
* ``anchor_merge`` (reducer): keep the sinks and the last prompt token, keep the best-scored candidates as *anchors*,
  and merge every other token into its positionally nearest anchor (plain mean of keys and values);
* ``distance_offset`` (decode scorer): whenever the budget rule asks for a drop, drop the entry at a positional index
  frozen at the end of prefill (``prefill_kept + 1 + offset``; default offset ``-25``);
* presets ``elastic`` (the paper's method, the authors' evaluation settings) and ``elastic_reference`` (the authors'
  code, quirks and all).

The decode scorer lives in :mod:`kvpolicy_plugins.elastic.decode` (re-exported here). kvpolicy implements the method
as the paper describes it by default; every place where the authors' code departs from it is a ``quirk_*`` switch
(default off) on the part that implements it, see ``docs/elastic.md``. The number of sinks is the policy's
(``sinks``, preset value 1): ``anchor_merge.start_size`` repeats it and ``distance_offset`` reads it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from kvpolicy.hookspecs import PartSpec, PresetSpec, hookimpl
from kvpolicy.parts import Share, consumer_spec, expand_scores
from kvpolicy.core.policy import LOGIT_BIAS, AttentionStat, LayerView, Reduction
from kvpolicy.core.selection import ranked_slots, shared_head_budgets, sort_by_position
from kvpolicy.params import POLICY_SINKS

from .decode import DROP_INDEX_KEY, DistanceOffset, DistanceOffsetParams

__all__ = [
    "DROP_INDEX_KEY",
    "AnchorMerge",
    "AnchorMergeParams",
    "DistanceOffset",
    "DistanceOffsetParams",
    "FrequencyParams",
    "FrequencyScorer",
    "kvpolicy_parts",
    "kvpolicy_presets",
]

#: the prefill statistic the frequency scorer needs: attention received from every query of the prompt
PROMPT_ATTENTION = AttentionStat(window=None)

#: bound on the float32 similarity block of the cosine assignment (elements), like the engine's statistics chunks
COSINE_CHUNK_ELEMENTS = 1 << 24

PAPER = 'Liu et al., ECCV 2024, "Efficient Inference of Vision Instruction-Following Models with Elastic Cache"'


# ===================================================================================================== helpers


def _keep_per_head(view: LayerView, keep: torch.Tensor) -> torch.Tensor:
    keep = keep.to(device=view.keys.device, dtype=torch.long)
    if keep.dim() == 1:
        keep = keep[:, None]
    return keep.expand(view.batch_size, view.num_heads)


def _to_sorted(t: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Per-slot ``t`` ``[B, H, P]`` laid out in positional order (``order`` from :meth:`LayerView.order`)."""
    return t.gather(-1, order)


def _nearest_by_position(
    positions: torch.Tensor, order: torch.Tensor, rank: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """For every slot, the slot of the positionally nearest ``targets`` slot (ties to the older one).

    O(P) per row: in positional order, the nearest target is the previous or the next target, found with a running
    max / reversed running min of target indices. Returns (target slot ``[B, H, P]``, has a target ``[B, H]``)."""
    p = order.shape[-1]
    tgt_sorted = _to_sorted(targets, order)
    pos_sorted = _to_sorted(positions, order)
    idx = torch.arange(p, device=order.device).expand_as(order)
    prev = torch.where(tgt_sorted, idx, -1).cummax(dim=-1).values
    nxt = torch.where(tgt_sorted, idx, p).flip(-1).cummin(dim=-1).values.flip(-1)
    has_prev, has_next = prev >= 0, nxt < p
    big = torch.iinfo(torch.long).max
    d_prev = torch.where(has_prev, pos_sorted - pos_sorted.gather(-1, prev.clamp(min=0)), big)
    d_next = torch.where(has_next, pos_sorted.gather(-1, nxt.clamp(max=p - 1)) - pos_sorted, big)
    choice = torch.where(d_prev <= d_next, prev, nxt).clamp(0, p - 1)  # sorted index of the chosen target
    chosen_slot_sorted = order.gather(-1, choice)
    # back from positional order to slots: slot s sits at sorted index rank[s]
    return chosen_slot_sorted.gather(-1, rank), targets.any(-1)


def _key_cosine(keys: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """float32 ``[B, H, P]``: the cosine similarity of every slot's key to the key of its ``target`` slot."""
    b, h, p, d = keys.shape
    k = torch.nn.functional.normalize(keys.to(torch.float32), dim=-1)
    return (k * k.gather(2, target[..., None].expand(b, h, p, d))).sum(-1)


def _nearest_by_cosine(
    keys: torch.Tensor, order: torch.Tensor, rank: torch.Tensor, targets: torch.Tensor, sources: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """For every source slot, the target slot whose key (same kv head) has the highest cosine similarity; ties to
    the older position. Computed in float32, in chunks of source rows."""
    b, h, p, d = keys.shape
    k_sorted = keys.gather(2, order[..., None].expand(b, h, p, d)).to(torch.float32)
    k_sorted = torch.nn.functional.normalize(k_sorted, dim=-1)
    tgt_sorted = _to_sorted(targets, order)
    src_sorted = _to_sorted(sources, order)
    choice = torch.zeros(b, h, p, dtype=torch.long, device=keys.device)
    rows = max(1, COSINE_CHUNK_ELEMENTS // max(1, b * h * p))
    for i0 in range(0, p, rows):
        i1 = min(p, i0 + rows)
        if not bool(src_sorted[:, :, i0:i1].any()):
            continue
        sim = torch.matmul(k_sorted[:, :, i0:i1], k_sorted.transpose(2, 3))  # [B, H, c, P]
        sim.masked_fill_(~tgt_sorted[:, :, None, :], float("-inf"))
        choice[:, :, i0:i1] = sim.argmax(dim=-1)  # first maximum = oldest position (positional layout)
    return order.gather(-1, choice).gather(-1, rank), targets.any(-1)


# ===================================================================================================== frequency


class FrequencyParams(BaseModel):
    """Parameters of the ``frequency`` encode scorer."""

    model_config = ConfigDict(extra="forbid")

    per_head: bool = Field(
        default=False,
        description="score per kv head ([B, H, P], one selection per kv head) instead of heads averaged ([B, 1, P])",
    )
    normalize: bool = Field(
        default=False,
        description="divide each key's score by the number of real prompt queries that can see it (removes the bias "
        "toward early tokens)",
    )


class FrequencyScorer:
    """Elastic Cache's importance score for the prompt (``frequency``).

    Liu et al., ECCV 2024, "Efficient Inference of Vision Instruction-Following Models with Elastic Cache":
    importance-driven cache merging in the instruction-encoding stage ranks entries by how much attention they
    receive.

    ``score[b, j] = sum_i mean_h A[b, h, i, j]``: the causal softmax attention key ``j`` receives from every prompt
    query ``i`` (image tokens included) during prefill, averaged over all query heads, one score row per layer and
    per batch row, shared by the heads. Computed by the engine in query chunks (``AttentionStat(window=None)``);
    pads neither give nor receive attention.

    Options (not in the paper): ``per_head`` keeps the kv-head axis, ``normalize`` divides by the number of real
    queries at or after the key (``held - rank``), i.e. mean instead of sum of attention received.

    Deviations from the authors' code: none in the score itself (they sum ``mean_h attentions[l][:, :, i, :i+1]``
    over queries ``i``, which is the same quantity); they materialise the full ``[heads, T, T]`` attention of every
    layer (``output_attentions=True``, eager attention), kvpolicy never does. Their batch > 1 path does not work
    (``score_sum[layer_num, ...] += [layer_num * B, ...]`` fails); kvpolicy scores every row separately.
    """

    def __init__(self, params: FrequencyParams | None = None, **kwargs: Any):
        self.params = params if params is not None else FrequencyParams(**kwargs)
        self.needs = frozenset({PROMPT_ATTENTION})
        self.provides = frozenset({"scores", "per_head_scores"} if self.params.per_head else {"scores"})

    def score(self, view: LayerView) -> torch.Tensor:
        if None not in view.attention:
            raise KeyError(
                "frequency: the view has no prompt attention (view.attention[None]); the engine computes it when the "
                "encode scorer declares AttentionStat(window=None) in `needs`"
            )
        att = view.attention[None].to(torch.float32)
        att = torch.where(view.valid, att, 0.0)
        if self.params.normalize:
            # real queries that can see key j: the real prompt tokens at or after j (itself included)
            seen_by = (view.held()[..., None] - view.rank()).clamp(min=1).to(torch.float32)
            att = torch.where(view.valid, att / seen_by, 0.0)
        if self.params.per_head:
            return att
        return att.mean(dim=1, keepdim=True)


# ===================================================================================================== anchor_merge


class AnchorMergeParams(BaseModel):
    """Parameters of the ``anchor_merge`` reducer."""

    model_config = ConfigDict(extra="forbid")

    start_size: int = Field(
        default=1,
        ge=0,
        le=4096,
        description="attention sinks: the first real tokens of each row, always kept, never merged into "
        "(authors' class default 4, every evaluation script passes 1). Repeats the policy's `sinks`: filled from it, "
        "or checked against it",
        json_schema_extra={POLICY_SINKS: True},
    )
    keep_last: bool = Field(default=True, description="always keep the last prompt token (the paper's protected token)")
    assign: Literal["position", "cosine"] = Field(
        default="position",
        description="how a dropped token picks its anchor: positionally nearest (paper) or highest key cosine "
        "similarity in the same kv head (ablation)",
    )
    weighting: Literal["mean", "score"] = Field(
        default="mean",
        description="anchor = plain mean of itself and its merged tokens (paper), or score-weighted mean (ablation; "
        "scores clamped at 0, a group with zero total weight falls back to the plain mean)",
    )
    merge: Literal["kv", "values"] = Field(
        default="kv", description="merge keys and values (paper) or values only, keys of anchors untouched (ablation)"
    )
    min_similarity: float | None = Field(
        default=None,
        ge=-1.0,
        le=1.0,
        description="merge a dropped token only if its key's cosine similarity to its anchor's key (same kv head) is at "
        "least this, evict it otherwise (ablation; D2O's idea with a fixed threshold). None: merge every dropped token "
        "(paper)",
    )
    heads: Literal["uniform", "shared"] = Field(
        default="uniform",
        description="how the layer's budget is split across its kv heads: the same count per head (paper), or shared "
        "by score, AdaKV's allocation (ablation; needs scores per kv head)",
    )
    head_floor: Share = Field(
        default=0.2,
        description="with heads: shared, the fraction of the uniform per-head budget every head keeps before the rest "
        "is shared (AdaKV's alpha; 0 = one ranking across the layer's heads, as KVzip)",
    )
    keep_mass: bool = Field(
        default=False,
        description="give each anchor a logit bias of log(tokens it stands for), so that it draws the attention its "
        "merged group drew (proportional attention, as in token merging; ablation, not in the paper). Needs "
        "decode_merge: false (decode-time merges do not count sizes)",
    )
    decode_merge: bool = Field(
        default=False,
        description="at decode time, merge each dropped entry into its positionally nearest surviving neighbour "
        "(mean of the two) instead of evicting it (ablation; the paper evicts)",
    )
    quirk_rank_by_index: bool = Field(
        default=False,
        description="authors' code: anchors = where(argsort(scores[start:T-1]) > forget_num)[0] + start, which "
        "compares token indices with a count and keeps rank positions (near-random w.r.t. the scores)",
    )
    quirk_off_by_one: bool = Field(
        default=False,
        description="authors' code: forget_num = int(T - T*(1-ratio)) and the mask keeps one entry fewer, so the "
        "cache holds keep - 1 entries (derived from the engine's keep = ceil(T*(1-ratio)): forget_num = T - keep)",
    )
    quirk_shifted_merge: bool = Field(
        default=False,
        description="authors' code: the merge sources lack the + start_size offset, so the tokens merged are the "
        "dropped ones shifted start_size positions earlier (the BOS sink can be merged into an anchor)",
    )


    @model_validator(mode="after")
    def _mass_at_prefill_only(self) -> AnchorMergeParams:
        if self.keep_mass and self.decode_merge:
            raise ValueError("keep_mass counts the tokens merged at prefill; decode_merge's merges would not be "
                             "counted: set one of keep_mass, decode_merge to false")
        return self

    def encode_requires(self) -> frozenset[str]:
        """A budget shared across heads ranks every head's entries against the others': the scores need a kv-head
        axis (checked when the policy is composed)."""
        return frozenset({"per_head_scores"}) if self.heads == "shared" else frozenset()


class AnchorMerge:
    """Elastic Cache's prefill compression (``anchor_merge``).

    Liu et al., ECCV 2024, "Efficient Inference of Vision Instruction-Following Models with Elastic Cache":
    importance-driven cache *merging* at instruction encoding: the most important entries become anchors and the
    others are merged into them instead of being discarded.

    Per batch row (and per kv head when the scores carry a head axis), with ``T`` the row's real prompt tokens and
    ``keep`` its budget:

    1. the first ``start_size`` real tokens (sinks) and the last prompt token are kept as they are;
    2. among the other tokens (candidates), the ``keep - start_size - 1`` highest-scored are *anchors* (ties to the
       older position, :func:`kvpolicy.core.selection.ranked_slots`), so the row holds exactly ``keep`` entries;
    3. every other candidate is assigned to its positionally nearest anchor (sinks and the last token are never
       targets; equal distance goes to the older anchor), and each anchor's key and value become the plain mean of
       itself and its assigned tokens (float32 sums, cast back).

    Pads are never kept, never merged. Rows whose budget covers all their tokens are left untouched; a row with no
    anchor (``keep <= start_size + 1``) keeps its protected tokens and evicts the rest (nothing to merge into). If
    ``keep < start_size + 1`` the last token wins over the newest sinks.

    Options (ablations, not in the paper): ``assign="cosine"``, ``weighting="score"``, ``merge="values"``,
    ``min_similarity`` (a dropped token whose key is less similar than this to its anchor's is evicted, not
    merged), ``heads="shared"`` (the layer's heads share one budget by score, AdaKV's allocation, so a head whose scores are
    concentrated keeps fewer anchors and absorbs more of its tokens; the count per head is
    :func:`~kvpolicy.core.selection.shared_head_budgets`, the same counts the ``adakv`` reducer keeps),
    ``keep_mass`` (each anchor's attention logit gets ``+ log`` of the tokens it stands for, through the engine's
    per-entry logit bias, :attr:`~kvpolicy.core.policy.Reduction.logit_bias`: ``n`` tokens with equal keys merged
    into one entry then draw exactly the attention the ``n`` drew), ``decode_merge`` (merge decode-time victims into
    their nearest neighbour instead of evicting).

    Deviations from the authors' code (each reproducible with a ``quirk_*`` switch, default off):

    * ``quirk_rank_by_index``: ``selected = where(argsort(scores[start:T-1]) > forget_num)[0] + start``;
    * ``quirk_off_by_one``: the cache holds ``keep - 1`` entries (``forget_num = T - keep``);
    * ``quirk_shifted_merge``: merge sources are the dropped candidates' indices *without* ``+ start_size``.

    Not reproduced: the authors' single selection shared by a whole batch (their batch > 1 path fails before it is
    reached, so there is no behaviour to reproduce); their prefill path for ``forget_num <= 1`` (prompts with
    ``T * ratio < 2``), where the decode branch drops index 0 instead. kvpolicy selects per row.
    """

    #: ``on_drop`` merges each row's victims within that row, from the view alone: the engine may run it for several
    #: layers at once
    stack_layers = True

    def __init__(self, params: AnchorMergeParams | None = None, **kwargs: Any):
        self.params = params if params is not None else AnchorMergeParams(**kwargs)

    @property
    def protected_sinks(self) -> int:
        """The sinks this reducer protects (``start_size``), stated so that the policy's ``sinks`` (what the decode
        scorer reads as ``view.sinks``) is derived from it or checked against it."""
        return self.params.start_size

    # -------------------------------------------------------------------------------------------- prefill
    def reduce(self, view: LayerView, scores: torch.Tensor, keep: torch.Tensor) -> Reduction:
        prm = self.params
        if prm.heads == "shared":
            if scores.dim() != 3 or scores.shape[1] != view.num_heads:
                raise ValueError(f"anchor_merge with heads: shared needs scores per kv head [B, H, P] "
                                 f"(H={view.num_heads}); got {tuple(scores.shape)}: use an encode scorer with "
                                 "per_head: true")
            keep = shared_head_budgets(view, scores, keep.reshape(view.batch_size, -1)[:, 0], prm.head_floor)
        s = expand_scores(view, scores, "anchor_merge")
        keep = _keep_per_head(view, keep)
        valid = view.valid
        held = view.held()
        order, rank = view.order(), view.rank()
        p = view.num_slots
        compress = keep < held  # rows (and heads) that lose entries; the others keep everything, untouched

        # 1. protected tokens: last real token, then up to start_size sinks within the budget
        n_last = ((keep >= 1) & prm.keep_last).to(torch.long)
        n_sink = torch.clamp(torch.clamp(keep - n_last, min=0), max=prm.start_size)
        last = valid & (n_last[..., None] > 0) & (rank == (held - 1)[..., None])
        sink = valid & (rank < n_sink[..., None])
        cand = valid & ~sink & ~last
        n_cand = cand.sum(-1)
        n_anchor = (keep - n_sink - n_last - int(prm.quirk_off_by_one)).clamp(min=0)
        n_anchor = torch.minimum(n_anchor, n_cand)

        # 2. anchors among the candidates
        cview = dataclasses.replace(view, valid=cand)
        if prm.quirk_rank_by_index:
            anchor = self._anchors_rank_by_index(cview, s, n_cand, n_anchor)
        else:
            best = ranked_slots(cview, s)  # candidates first, best first, ties to the older position
            first = torch.arange(p, device=s.device) < n_anchor[..., None]
            anchor = torch.zeros_like(valid).scatter_(-1, best, first)
        anchor &= cand
        kept = torch.where(compress[..., None], sink | last | anchor, valid)
        dropped = compress[..., None] & cand & ~anchor

        # 3. merge sources (dropped tokens, or with the quirk the dropped candidate indices without + start)
        if prm.quirk_shifted_merge:
            d_sorted = _to_sorted(dropped, order)
            src_idx = torch.arange(p, device=s.device) + n_sink[..., None]
            src_sorted = d_sorted.gather(-1, src_idx.clamp(max=p - 1)) & (src_idx < p)
            sources = src_sorted.gather(-1, rank) & valid  # back to slots
        else:
            sources = dropped
        keys, values, bias = self._merge(view, s, anchor & compress[..., None], sources, order, rank)

        # 4. the kept slots, in positional order
        n_kept = kept.sum(-1)
        k_max = int(n_kept.max()) if n_kept.numel() else 0
        first_kept = (~_to_sorted(kept, order)).to(torch.int8).argsort(dim=-1, stable=True)
        index = order.gather(-1, first_kept)[..., :k_max]
        ok = torch.arange(k_max, device=s.device) < n_kept[..., None]
        red = sort_by_position(view, index, ok)
        d, dv = keys.shape[-1], values.shape[-1]
        red.keys = keys.gather(2, red.index[..., None].expand(*red.index.shape, d))
        red.values = values.gather(2, red.index[..., None].expand(*red.index.shape, dv))
        if bias is not None:
            red.logit_bias = bias.gather(2, red.index)
        return red

    @staticmethod
    def _anchors_rank_by_index(
        cview: LayerView, s: torch.Tensor, n_cand: torch.Tensor, n_anchor: torch.Tensor
    ) -> torch.Tensor:
        """The authors' expression, per row: with ``c`` the candidates in positional order (``L`` of them) and
        ``perm = argsort(scores[c])`` ascending, the anchors are ``c[r]`` for every *rank* ``r`` whose *index*
        ``perm[r] > threshold``, with ``threshold = L - 1 - n_anchor`` (``= forget_num`` of the authors' code)."""
        p = s.shape[-1]
        corder = cview.order()  # candidates first, in positional order
        c_scores = s.gather(-1, corder)
        is_cand = cview.valid.gather(-1, corder)
        perm = c_scores.argsort(dim=-1, stable=True)  # ascending, ties to the older candidate
        perm = perm.gather(-1, (~is_cand).gather(-1, perm).to(torch.int8).argsort(dim=-1, stable=True))
        threshold = n_cand - 1 - n_anchor
        r = torch.arange(p, device=s.device)
        hit = (r < n_cand[..., None]) & (perm > threshold[..., None])
        return torch.zeros_like(cview.valid).scatter_(-1, corder, hit)

    def _merge(
        self,
        view: LayerView,
        s: torch.Tensor,
        anchor: torch.Tensor,
        sources: torch.Tensor,
        order: torch.Tensor,
        rank: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Full ``keys``/``values`` with each anchor replaced by the (weighted) mean of itself and its sources, and
        with ``keep_mass`` the full ``[B, H, P]`` logit bias: ``log`` of the tokens each slot stands for (its own
        size plus its sources' sizes; a size is ``exp`` of the slot's previous bias, 1 for a slot never merged)."""
        prm = self.params
        before = view.slot_state.get(LOGIT_BIAS)
        size = torch.ones(view.valid.shape, dtype=torch.float32, device=view.valid.device)
        if before is not None:
            size = before.to(torch.float32).exp().expand_as(size)
        if prm.assign == "cosine":
            target, has = _nearest_by_cosine(view.keys, order, rank, anchor, sources)
        else:
            target, has = _nearest_by_position(view.positions, order, rank, anchor)
        sources = sources & has[..., None]
        if prm.min_similarity is not None:
            sources = sources & (_key_cosine(view.keys, target) >= prm.min_similarity)
        if not bool(sources.any()):
            return view.keys, view.values, (size.log() if prm.keep_mass else None)
        hits = torch.zeros(anchor.shape, dtype=torch.float32, device=anchor.device)
        received = anchor & (hits.scatter_add_(-1, target, sources.to(torch.float32)) > 0)
        bias = None
        if prm.keep_mass:
            grown = torch.where(anchor, size, 0.0).scatter_add(-1, target, torch.where(sources, size, 0.0))
            bias = torch.where(received, grown, size).log()
        if prm.weighting == "score":
            w = s.clamp(min=0.0)
        else:
            w = size.clone()  # the plain mean over the tokens: an entry that already stands for n counts n times
        ws = torch.where(sources, w, 0.0)
        wa = torch.where(anchor, w, 0.0)
        total = wa.scatter_add(-1, target, ws)
        if prm.weighting == "score":
            zero = received & (total <= 0)
            if bool(zero.any()):  # weights all zero: plain mean for that group
                ones_a, ones_s = anchor.to(torch.float32), sources.to(torch.float32)
                plain = ones_a.scatter_add(-1, target, ones_s)
                ws = torch.where(zero.gather(-1, target) & sources, 1.0, ws)
                wa = torch.where(zero, 1.0, wa)
                total = torch.where(zero, plain, total)

        def merged(x: torch.Tensor) -> torch.Tensor:
            x32 = x.to(torch.float32)
            acc = torch.where(anchor[..., None], x32 * wa[..., None], 0.0)
            src = torch.where(sources[..., None], x32 * ws[..., None], 0.0)
            acc.scatter_add_(2, target[..., None].expand_as(x32), src)
            out = acc / total.clamp(min=torch.finfo(torch.float32).tiny)[..., None]
            return torch.where(received[..., None], out, x32).to(x.dtype)

        keys = view.keys if prm.merge == "values" else merged(view.keys)
        return keys, merged(view.values), bias

    # -------------------------------------------------------------------------------------------- decode
    def on_drop(
        self, view: LayerView, victims: torch.Tensor, victim_valid: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """With ``decode_merge``: merge each victim into its positionally nearest surviving entry that is not one of
        the policy's sinks (ties to the older one): that entry's key and value become the mean of itself and the
        victims assigned to it. Without it, evict (return ``None``)."""
        if not self.params.decode_merge:
            return None
        drop = torch.zeros_like(view.valid).scatter_(-1, victims, victim_valid) & view.valid
        survivors = view.valid & ~drop & ~view.sink_mask()  # the policy's sinks are never merged into
        target, has = _nearest_by_position(view.positions, view.order(), view.rank(), survivors)
        sources = drop & has[..., None]
        if not bool(sources.any()):
            return None
        ones = torch.ones(view.valid.shape, dtype=torch.float32, device=view.keys.device)
        total = torch.where(survivors, ones, 0.0).scatter_add(-1, torch.where(sources, target, 0), sources.float())
        received = survivors & (total > 1)

        def merged(x: torch.Tensor) -> torch.Tensor:
            x32 = x.to(torch.float32)
            acc = torch.where(survivors[..., None], x32, 0.0)
            src = torch.where(sources[..., None], x32, 0.0)
            acc.scatter_add_(2, torch.where(sources, target, 0)[..., None].expand_as(x32), src)
            out = acc / total.clamp(min=1.0)[..., None]
            return torch.where(received[..., None], out, x32).to(x.dtype)

        return merged(view.keys), merged(view.values)


# ===================================================================================================== registration


@hookimpl
def kvpolicy_parts() -> list[PartSpec]:
    return [
        PartSpec(
            name="frequency",
            kind="encode",
            params=FrequencyParams,
            factory=FrequencyScorer,
            summary="Elastic Cache: attention received from every prompt query during prefill, heads averaged",
            provides=frozenset({"scores", "per_head_scores"}),  # per-head only with per_head=True
        ),
        consumer_spec(
            name="anchor_merge",
            kind="reducer",
            params=AnchorMergeParams,
            factory=AnchorMerge,
            summary="Elastic Cache: keep sinks, the last token and the top-scored anchors; merge the rest into the "
            "nearest anchor",
        ),
        PartSpec(
            name="distance_offset",
            kind="decode",
            params=DistanceOffsetParams,
            factory=DistanceOffset,
            summary="Elastic Cache: drop the entry at a fixed index frozen after prefill (FIFO after it)",
        ),
    ]


#: The authors' evaluation settings: ratio 0.2 is the fraction *removed* (their forget_num = int(T - T*(1-ratio))),
#: i.e. the cache keeps 80% of the tokens seen; 1 sink (every script's --start-size, stated once as the policy's
#: ``sinks``: anchor_merge's start_size is filled from it and distance_offset never drops below it), offset -25
#: (class default).
ELASTIC_POLICY: dict[str, Any] = {
    "encode": {"name": "frequency"},
    "reducer": {"name": "anchor_merge"},
    "decode": {"name": "distance_offset", "offset": -25},
    "ratio": 0.2,
    "sinks": 1,
}

#: The same settings with every quirk of the authors' code switched on (see docs/elastic.md). Quirks are named in
#: ``reference_quirks`` (not as part parameters) so that a user's ``reference_quirks: {off_by_one: false}`` laid
#: over this preset turns exactly that one off.
ELASTIC_REFERENCE_POLICY: dict[str, Any] = {
    "encode": {"name": "frequency"},
    "reducer": {"name": "anchor_merge"},
    "decode": {"name": "distance_offset", "offset": -25},
    "ratio": 0.2,
    "sinks": 1,
    "reference_quirks": {
        "rank_by_index": True,
        "off_by_one": True,
        "shifted_merge": True,
        "raw_index": True,
        "drop_after_attention": True,
        "compressed_positions": True,
    },
}


@hookimpl
def kvpolicy_presets() -> list[PresetSpec]:
    return [
        PresetSpec(
            name="elastic",
            summary="Elastic Cache (paper): frequency + anchor merge (1 sink) at prefill, distance offset -25 while "
            "decoding, 20% of the cache removed",
            policy=ELASTIC_POLICY,
        ),
        PresetSpec(
            name="elastic_reference",
            summary="Elastic Cache as the authors' code runs it (index-vs-rank selection, off-by-one, shifted merge, "
            "raw drop index, drop after attention, positions from the compressed length), ratio 0.2",
            policy=ELASTIC_REFERENCE_POLICY,
        ),
    ]
