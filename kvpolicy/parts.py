"""The building blocks that several policy plugins share: one statement of each rule, imported by every method.

Why a module of its own: the eviction baselines (``h2o``, ``tova``, ``snapkv``, ``local``, ...) all need the same
small rules (attention sinks and recent windows by positional rank, ``+inf`` protection, the prompt's TEXT entries
kept, head averaging, the cumulative attention kept in ``view.slot_state``), and LOOK-M and D2O share their selection,
their merge math and two whole scorers. When these lived in ``plugins/evict.py`` and ``plugins/lookm.py`` every
plugin imported another plugin; now each plugin module is one method and imports its shared pieces from here.
Third-party plugins may use them too (``from kvpolicy.parts import sinks, recent, protect``).

This module imports only kvpolicy's core data types (:mod:`kvpolicy.core.policy`, :mod:`kvpolicy.core.selection`,
the plugin specs of :mod:`kvpolicy.hookspecs`), never the evaluation, sweep, bench or CLI layers, so a plugin that
uses it pulls in nothing but what the engine needs.

* scores, windows, protection: :func:`heads`, :func:`full_shape`, :func:`sinks`, :func:`recent`, :func:`protect`,
  :func:`protect_text`, :func:`check_attention`;
* part construction: :func:`build` (a params model, a mapping or keywords -> the validated params model); the
  parameter types :data:`Tokens` and :data:`Share` (one statement of the bounds of a token count and of a share);
* registration: :func:`consumer_spec` (a reducer or allocator: consumes scores, provides none),
  :func:`accumulated_specs` (the encode and decode scorers LOOK-M and D2O share, with their capability tags);
* accumulated attention (H2O's statistic): :data:`ATTENTION_SUM`, :class:`AttentionAccumulator`;
* heavy hitters + recent window (LOOK-M, D2O): :func:`heavy_recent_select`, :func:`reduction_from_mask`,
  :func:`victim_mask`;
* merging evicted entries into similar kept ones (LOOK-M, D2O): :func:`most_similar`, :func:`merge_kv`,
  :func:`row_mean`;
* whole scorers shared by LOOK-M and D2O: :class:`AccumulatedAttention`, :class:`HeavyRecentDecode`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from kvpolicy.core.policy import IMAGE, TEXT, AttentionStat, LayerView, Reduction
from kvpolicy.core.selection import ranked_slots, sort_by_position
from kvpolicy.hookspecs import PartKind, PartSpec

INF = float("inf")

#: ``view.slot_state`` key of the cumulative attention received by each entry (prefill column sums plus one row per
#: decode step), kept by the decode scorers that track it (``h2o``, ``local`` with ``track_attention``) and read by
#: the ``cam`` reducer for its merge probabilities.
ATTENTION_SUM = "attention_sum"

#: the statistics behind :data:`ATTENTION_SUM`
PROMPT_ATTENTION = AttentionStat(window=None)
STEP_ATTENTION = AttentionStat(window=1)

#: bound on the float32 similarity block (elements) computed at once by :func:`most_similar`
SIM_CHUNK_ELEMENTS = 1 << 24

#: merge strategies: LOOK-M's three (and ``none`` = evict), plus D2O's similarity-softmax weights
MergeStrategy = Literal["average", "pivotal", "weighted", "softmax", "none"]


# ======================================================================================= scores, windows, protection


def heads(t: torch.Tensor, per_head: bool) -> torch.Tensor:
    """``t`` ``[B, H, P]`` as float32, or its mean over kv heads ``[B, 1, P]`` (one decision shared by the heads).

    The engine's attention statistics are already averaged over the query heads of each kv head, and every kv head
    has the same number of query heads, so the mean over kv heads is the mean over all query heads."""
    t = t if t.dtype == torch.float32 else t.to(torch.float32)
    return t if per_head else t.mean(dim=1, keepdim=True)


def full_shape(view: LayerView, scores: torch.Tensor) -> torch.Tensor:
    """``scores`` ``[B, H or 1, P]`` broadcast to ``[B, H, P]`` (a copy, safe to edit)."""
    return scores.to(torch.float32).expand(view.batch_size, view.num_heads, view.num_slots).clone()


def sinks(view: LayerView, n: int) -> torch.Tensor:
    """bool ``[B, H, P]``: the ``n`` oldest valid entries of each row (attention sinks)."""
    return view.valid & (view.rank() < n)


def recent(view: LayerView, n: int) -> torch.Tensor:
    """bool ``[B, H, P]``: the ``n`` newest valid entries of each row."""
    return view.valid & (view.rank() >= (view.held() - n)[..., None])


def protect(view: LayerView, scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``scores`` as ``[B, H, P]`` with ``+inf`` where ``mask``: such entries are kept first and never dropped (a
    new tensor; one out-of-place fill where the shapes allow, as every decode drop of a scorer calls this)."""
    out = (scores if scores.dtype == torch.float32 else scores.to(torch.float32)).masked_fill(mask, INF)
    if out.shape != (view.batch_size, view.num_heads, view.num_slots):
        out = full_shape(view, out)
    return out


def protect_text(view: LayerView, scores: torch.Tensor, enabled: bool) -> torch.Tensor:
    """With ``enabled``, ``+inf`` for the prompt's TEXT entries (multimodal prompts: only image entries compete for
    the budget; when the text alone exceeds the budget, the oldest text entries are kept)."""
    if not enabled:
        return scores
    return protect(view, scores, view.valid & (view.token_types == TEXT))


def check_attention(view: LayerView, window: int | None, who: str) -> torch.Tensor:
    """``view.attention[window]`` or a clear error naming the part whose statistic is missing."""
    att = view.attention.get(window)
    if att is None:
        raise RuntimeError(
            f"{who}: layer {view.layer_idx} ({view.stage}) has no attention statistic for window={window!r}; "
            f"available: {sorted(view.attention, key=repr)}. Parts must declare it in `needs` (or `prefill_needs`)."
        )
    return att


# ================================================================================================= part construction


def build(cls: type, params_cls: type[BaseModel], params: Any, kwargs: dict[str, Any]) -> Any:
    """Validated parameters for a part constructor that accepts ``params`` (a model or a mapping) or keywords.

    Why: the registry builds parts as ``factory(validated_params_model)`` while tests and notebooks write
    ``Part(recent=8)``; every part accepts both through this one function, so the two paths validate alike."""
    if params is None:
        return params_cls(**kwargs)
    if kwargs:
        raise TypeError(f"{cls.__name__}: pass either a params model or keyword arguments, not both")
    if isinstance(params, params_cls):
        return params
    if isinstance(params, BaseModel):
        return params_cls.model_validate(params.model_dump())
    return params_cls.model_validate(dict(params))


#: a parameter counting tokens (windows, sinks): ``name: Tokens = Field(default=..., description=...)``; the bound is
#: far above any context length, so it only rejects nonsense (a negative count, an overflowing one)
Tokens = Annotated[int, Field(ge=0, le=1 << 20)]

#: a parameter that is a share of something (a budget, a window), from 0 to 1
Share = Annotated[float, Field(ge=0.0, le=1.0)]


def consumer_spec(
    name: str,
    kind: PartKind,
    params: type[BaseModel],
    factory: Any,
    summary: str,
    requires: frozenset[str] = frozenset({"scores"}),
) -> PartSpec:
    """The :class:`PartSpec` of a part that consumes scores and provides none (a reducer, a budget allocator).

    Why: every such part declares the same capability tags; stated here once, a plugin names only what differs."""
    return PartSpec(
        name=name, kind=kind, params=params, factory=factory, summary=summary, provides=frozenset(), requires=requires
    )


# ============================================================================================= accumulated attention


class AttentionAccumulator:
    """Mixin for decode scorers that keep the cumulative attention each entry received (H2O's statistic).

    ``init_state`` seeds it from the prompt (prefill column sums, ``AttentionStat(None)``, computed because the part
    declares it in ``prefill_needs``); ``observe`` adds the current query's attention row at every decode step
    (``AttentionStat(1)``). The engine keeps the tensor aligned with the slots (reductions, drops, appends) and hands it
    back as ``view.slot_state[ATTENTION_SUM]``, float32 ``[B, H, P]``."""

    accumulate_per_head: bool = True

    def init_state(self, view: LayerView) -> dict[str, torch.Tensor]:
        att = check_attention(view, None, type(self).__name__)
        return {ATTENTION_SUM: heads(att, self.accumulate_per_head)}

    def accumulated(self, view: LayerView) -> torch.Tensor:
        """The cumulative attention the engine keeps for this scorer, float32 ``[B, H or 1, P]`` (its storage: edit
        a copy), or an error naming the scorer when it is missing (``init_state`` did not run at prefill)."""
        acc = view.slot_state.get(ATTENTION_SUM)
        if acc is None:
            raise RuntimeError(
                f"{type(self).__name__}: no '{ATTENTION_SUM}' slot state (init_state was not called at prefill)"
            )
        return acc

    def observe(self, view: LayerView) -> None:
        acc = self.accumulated(view)
        att = check_attention(view, 1, type(self).__name__)
        # in place: engine storage. Invalid slots receive exactly 0 from the engine (AttentionStat), so nothing to mask
        acc.add_(heads(att, self.accumulate_per_head))


# ======================================================================= heavy hitters + recent window (LOOK-M, D2O)


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


def victim_mask(view: LayerView, victims: torch.Tensor, victim_valid: torch.Tensor) -> torch.Tensor:
    """bool ``[B, H, P]``: the valid slots a decode-time drop names (``on_drop``'s ``victims`` int64 ``[B, H, V]``
    with ``victim_valid``).

    Why: the engine hands ``on_drop`` slot indices, while selection and merging (:func:`most_similar`,
    :func:`merge_kv`) work on masks; every merging reducer needs this conversion, stated once here."""
    return torch.zeros_like(view.valid).scatter_(-1, victims, victim_valid) & view.valid


def reduction_from_mask(
    view: LayerView, kept: torch.Tensor, keys: torch.Tensor | None = None, values: torch.Tensor | None = None
) -> Reduction:
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


# ============================================================================= merging evicted entries (LOOK-M, D2O)


# LOOK-M and D2O differ in which evicted entries they merge (all of them / those above a running similarity threshold)
# and in the weights, not in the mechanics: find each evicted entry's most similar kept key, then fold it into that
# entry. The mechanics live here once; each reducer passes its own filter and strategy.

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
    strategy: MergeStrategy,
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


# ================================================================================== scorers shared by LOOK-M and D2O


class AccumulatedParams(BaseModel):
    """Parameters of the ``lookm`` and ``d2o`` encode scorers."""

    model_config = ConfigDict(extra="forbid")

    per_head: bool = Field(
        default=True,
        description="score per kv head (the authors' code keeps one score row per head); false: mean over heads",
    )


class HeavyRecentDecodeParams(BaseModel):
    """Parameters of the ``lookm`` decode scorer."""

    model_config = ConfigDict(extra="forbid")

    text_prior: bool = Field(
        default=True, description="drop image entries first (lowest score), text and generated entries only after"
    )
    recent_share: Share = Field(
        default=0.5,
        description="recent window as a share of the layer's budget (entries held after prefill), never dropped",
    )
    recent: Tokens | None = Field(default=None, description="recent window in tokens (overrides recent_share)")
    start_size: Tokens = Field(default=0, description="oldest entries never dropped (sinks)")
    per_head: bool = Field(default=True, description="accumulate and decide per kv head; false: mean over heads")


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
        acc = self.accumulated(view).to(torch.float32).expand(view.batch_size, view.num_heads, view.num_slots)
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


def accumulated_specs(
    name: str, encode_summary: str, decode_params: type[BaseModel], decode_factory: Any, decode_summary: str
) -> list[PartSpec]:
    """The encode (:class:`AccumulatedAttention`) and decode (a :class:`HeavyRecentDecode`) :class:`PartSpec` of a
    method built on the shared accumulated-attention scorers (``lookm``, ``d2o``), with the tags those scorers provide.

    Why: the tags are facts about the shared classes (per-head scores; the decode scorer keeps the cumulative
    attention), so they are stated next to them, once, rather than in each plugin that registers them."""
    return [
        PartSpec(
            name=name,
            kind="encode",
            params=AccumulatedParams,
            factory=AccumulatedAttention,
            summary=encode_summary,
            provides=frozenset({"scores", "per_head_scores"}),
        ),
        PartSpec(
            name=name,
            kind="decode",
            params=decode_params,
            factory=decode_factory,
            summary=decode_summary,
            provides=frozenset({"scores", "per_head_scores", "cumulative_attention"}),
        ),
    ]
