"""H2O (Heavy-Hitter Oracle): keep the entries that received the most attention, plus a recent window.

Zhang et al., NeurIPS 2023, "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language Models"
(arXiv 2306.14048).

* ``h2o`` (encode scorer): the attention each prompt entry received from every prompt query (column sums of the
  causal softmax, ``AttentionStat(None)``), per kv head (default) or averaged over heads; ``+inf`` for the newest
  ``recent`` entries;
* ``h2o`` (decode scorer): the same accumulator, seeded from the prompt and increased by every generated token's
  attention row (``AttentionStat(1)``); the lowest-scored entry outside the recent window is evicted;
* ``normalize: mean_over_visible`` (both scorers): the sum divided by the number of queries that can see the entry,
  kvpress's ObservedAttentionPress variant (default ``sum``, the paper's score);
* ``h2o_elastic_code`` (decode scorer): the ``H2OCache`` baseline of the Elastic Cache authors' code — one score
  vector averaged over heads *and layers*, no recent window, switchable reproductions of its quirks;
* presets ``h2o`` (ratio 0.5) and ``h2o_elastic_code`` (their evaluation settings, ratio 0.2, every quirk on).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from kvpolicy.hookspecs import PartSpec, PresetSpec, hookimpl
from kvpolicy.parts import (
    INF,
    PROMPT_ATTENTION,
    STEP_ATTENTION,
    AttentionAccumulator,
    Tokens,
    build,
    check_attention,
    heads,
    protect,
    protect_text,
    recent,
)
from kvpolicy.core.policy import AttentionStat, LayerView

PAPER = 'Zhang et al., NeurIPS 2023, "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of LLMs"'


class H2OParams(BaseModel):
    """Parameters of the ``h2o`` encode and decode scorers."""

    model_config = ConfigDict(extra="forbid")

    recent: Tokens = Field(
        default=32,
        description="newest entries of each row always kept (the recent window), in tokens; should be below the budget",
    )
    per_head: bool = Field(
        default=True, description="rank entries per kv head (the paper); false: one ranking from the head-mean"
    )
    protect_text: bool = Field(
        default=False, description="multimodal prompts: never evict TEXT entries, only image (and generated) ones"
    )
    normalize: Literal["sum", "mean_over_visible"] = Field(
        default="sum",
        description="sum: the attention received, summed over the queries (the H2O paper); mean_over_visible: "
        "divided by the number of queries that can see the entry (kvpress's ObservedAttentionPress)",
    )


def visible_queries(view: LayerView, current_forward: bool) -> torch.Tensor:
    """float32 ``[B, H, P]``: how many real queries can see each entry (causal: those at its column or later).

    ``current_forward``: only the queries of the current forward pass (what ``AttentionStat(None)`` sums at
    prefill); otherwise every real query since the row's first real token (what the decode accumulator has summed
    when the prompt came in one forward and every step added its row). Left pads are never queries. At least 1, so
    freed and pad slots divide by 1 (their scores are ignored anyway)."""
    first = view.seen - view.n_tokens.to(view.positions.device)  # [B]: column of each row's first real token
    if current_forward:
        first = first.clamp(min=view.seen - view.new_tokens)
    cols = torch.maximum(view.positions, first[:, None, None])
    return (view.seen - cols).clamp(min=1).to(torch.float32)


def normalized(view: LayerView, att: torch.Tensor, normalize: str, current_forward: bool) -> torch.Tensor:
    """``att`` ``[B, H or 1, P]`` summed over queries, or (``mean_over_visible``) its mean over the queries that can
    see each entry: kvpress's ObservedAttentionPress divides the column sums by ``n - j``, which stops the oldest
    entries from winning merely because more queries attended to them."""
    if normalize == "sum":
        return att
    return att.to(torch.float32) / visible_queries(view, current_forward)


class H2OScorer:
    """H2O at prefill (``h2o`` encode scorer).

    Zhang et al., NeurIPS 2023, "H2O: Heavy-Hitter Oracle": an entry's importance is the attention it has
    accumulated; the cache keeps the heavy hitters plus the most recent tokens. Score of entry ``j`` of a row:
    ``sum_i A[h, i, j]`` over every prompt query ``i`` (causal softmax; with GQA averaged over the query heads of kv
    head ``h``), per kv head (``per_head=True``, as the paper keeps heavy hitters per head) or averaged over heads;
    the newest ``recent`` entries score ``+inf``. ``normalize="mean_over_visible"`` divides the sum by the number of
    prompt queries that can see ``j`` (kvpress's ObservedAttentionPress; the paper's score is the sum, the default).

    Deviations: the paper splits the budget between heavy hitters and the recent window (half and half in its
    experiments); a scorer does not see the budget, so the window is given in tokens (``recent``) and the heavy
    hitters get the rest. With GQA a kv head's score is the mean of its query heads' (the paper has no GQA)."""

    def __init__(self, params: H2OParams | None = None, **kwargs: Any):
        self.params = build(H2OScorer, H2OParams, params, kwargs)
        self.needs: frozenset[AttentionStat] = frozenset({PROMPT_ATTENTION})

    def score(self, view: LayerView) -> torch.Tensor:
        prm = self.params
        att = normalized(view, heads(check_attention(view, None, "h2o"), prm.per_head), prm.normalize, True)
        scores = protect(view, att, recent(view, prm.recent))
        return protect_text(view, scores, prm.protect_text)


class H2ODecode(AttentionAccumulator):
    """H2O while decoding (``h2o`` decode scorer).

    Zhang et al., NeurIPS 2023, "H2O: Heavy-Hitter Oracle": at every step the new token's attention row is added to
    each entry's accumulated score; when the cache is over budget, the lowest-scored entry outside the recent window
    is evicted. The accumulator is seeded from the prompt's attention (``prefill_needs``, computed at prefill even
    when the encode scorer is not ``h2o``), kept per slot by the engine (``slot_state['attention_sum']``) and
    increased by ``observe``. The step's attention is needed before the decision, so the drop happens after the
    step's attention (as in the paper: the new token attends to ``budget + 1`` entries, then one is evicted).
    ``normalize="mean_over_visible"`` ranks by the accumulated sum divided by the real queries since the entry's
    column (prompt and generated), kvpress's averaging carried on through decoding."""

    #: every row is scored from its own slots and the view alone: the engine may score several layers at once
    stack_layers = True

    def __init__(self, params: H2OParams | None = None, **kwargs: Any):
        self.params = build(H2ODecode, H2OParams, params, kwargs)
        self.needs: frozenset[AttentionStat] = frozenset({STEP_ATTENTION})
        self.prefill_needs: frozenset[AttentionStat] = frozenset({PROMPT_ATTENTION})
        self.accumulate_per_head = self.params.per_head

    def drop_scores(self, view: LayerView) -> torch.Tensor:
        prm = self.params
        acc = normalized(view, self.accumulated(view), prm.normalize, False)
        scores = protect(view, acc, recent(view, prm.recent))
        return protect_text(view, scores, prm.protect_text)


# ===================================================================================================== h2o_elastic_code


class H2OElasticCodeParams(BaseModel):
    """Parameters of the ``h2o_elastic_code`` decode scorer."""

    model_config = ConfigDict(extra="forbid")

    start_size: Tokens = Field(
        default=1,
        description="entries never dropped by single decode drops (their scripts pass 1; class default 4); the bulk "
        "prefill compression does not protect them",
    )
    quirk_rank_by_index: bool = Field(
        default=False,
        description="authors' code: the bulk compression keeps where(argsort(score) > forget_num), comparing token "
        "indices with the count (close to random); off: drop the lowest scores",
    )
    quirk_misaligned_scores: bool = Field(
        default=False,
        description="authors' code: the score vector is not compacted after the bulk compression, so entry j keeps "
        "the score of the token that was at index j before it",
    )


class H2OElasticCode:
    """The Elastic Cache authors' H2O baseline (``h2o_elastic_code`` decode scorer).

    Reproduces ``H2OCache`` of github.com/liuzuyan/ElasticCache (``kv_cache.py``, commit 3138e03) — the H2O the
    Elastic Cache paper compares against — not the H2O paper (use ``h2o`` for that). Its rules:

    * one score vector per sequence: attention averaged over heads **and layers** (``mean_l mean_h A``), accumulated
      over every prompt query and every generated token, indexed by *cache index* (an entry's rank in the cache);
    * no prefill-time encode scorer: the whole policy is this decode part. The first drop (the "bulk" compression of
      the prompt, ``forget_num > 1``) removes the lowest scores among every entry but the last prompt token (no sinks,
      no recent window); every later drop removes the single lowest score among entries ``[start_size, newest)`` and
      shifts the score vector left;
    * ``quirk_rank_by_index``: the bulk compression keeps ``where(argsort(score) > forget_num)`` — token indices
      compared with a count — exactly reproduced for the count the engine drops (scores ``argsort(score)[r]`` at
      cache index ``r`` make the ``e`` lowest exactly the authors' dropped set with ``forget_num = e - 1``);
    * ``quirk_misaligned_scores``: after the bulk compression the score vector is not compacted (entry ``j`` keeps
      the score of the token that was at index ``j``; stale scores beyond the new length persist); later single drops
      shift it as the authors do.

    What kvpolicy cannot reproduce exactly, and does instead (needs an engine change, see docs/baselines.md):

    * the layer average needs every layer's attention, but the engine compresses layer ``l`` before layer ``l+1``
      runs. So nothing is compressed at prefill; the bulk compression happens at the **first decode step** after its
      attention (that step attends to the uncompressed prompt), with the engine's count ``e = trunc((T+1) * ratio)``
      instead of the authors' ``trunc(T * ratio) + 1`` (their off-by-one is not reproduced);
    * each decision uses the scores accumulated up to the **previous** step (all layers), not the current step's row:
      the current step's later layers have not run yet when layer 0 must decide. All layers thus take the same
      decision, as in the authors' code (whose caches stay aligned across layers);
    * batches: one score vector per row (their code supports batch 1 only).

    The policy object holds the cross-layer state (this part instance is shared by all layers of the cache it is used
    in): use one policy per concurrent cache. A new prefill resets it.
    """

    def __init__(self, params: H2OElasticCodeParams | None = None, **kwargs: Any):
        self.params = build(H2OElasticCode, H2OElasticCodeParams, params, kwargs)
        self.needs: frozenset[AttentionStat] = frozenset({STEP_ATTENTION})
        self.prefill_needs: frozenset[AttentionStat] = frozenset({PROMPT_ATTENTION})
        self._reset()

    # ------------------------------------------------------------------ cross-layer state
    def _reset(self) -> None:
        self.score: torch.Tensor | None = None  #: float32 [B, N]: the authors' score_sum, per row, by cache index
        self._snapshot: torch.Tensor | None = None  #: score as of the end of the previous step (decisions use it)
        self._prefill_layers: set[int] = set()
        self._prompt_seen = 0
        self._step_seen = -1
        self._prev_positions: list[list[int]] | None = None  #: layer 0's layout at the previous step (by cache index)

    def _ensure(self, b: int, n: int, device: torch.device) -> torch.Tensor:
        if self.score is None:
            self.score = torch.zeros(b, n, dtype=torch.float32, device=device)
        elif self.score.shape[1] < n:
            self.score = _pad(self.score, n)
        return self.score

    def _add(self, view: LayerView, att: torch.Tensor) -> None:
        """score[b, cache index of slot p] += mean over heads of att[b, :, p] / num_layers (valid slots only)."""
        rank = view.rank()[:, 0]  # every head has the same layout under this policy
        valid = view.valid[:, 0]
        row = att.to(torch.float32).mean(dim=1).masked_fill(~valid, 0.0) / view.num_layers
        score = self._ensure(view.batch_size, view.num_slots, row.device)
        score.scatter_add_(1, rank, row)

    @staticmethod
    def _layout(view: LayerView) -> list[list[int]]:
        """Per row, the logical positions of the valid entries in cache-index order (head 0)."""
        return [sorted(view.positions[b, 0][view.valid[b, 0]].tolist()) for b in range(view.batch_size)]

    def _new_step(self, view: LayerView) -> None:
        """First layer of a decode step: apply the previous step's drops to the score vector, then snapshot it."""
        layout = self._layout(view)
        score = self._ensure(view.batch_size, view.num_slots, view.keys.device)
        prev_was_first = self._step_seen == self._prompt_seen + 1
        if self._prev_positions is not None:
            for b, (before, now) in enumerate(zip(self._prev_positions, layout)):
                present = set(now)
                gone = {i for i, p in enumerate(before) if p not in present}
                if not gone or (prev_was_first and self.params.quirk_misaligned_scores):
                    continue  # the authors never compact score_sum after the prefill compression
                keep = torch.tensor([i for i in range(score.shape[1]) if i not in gone], device=score.device)
                row = score[b].index_select(0, keep)
                score[b] = torch.cat([row, row.new_zeros(len(gone))])
        self._prev_positions = layout
        self._snapshot = score.clone()

    # ------------------------------------------------------------------ DecodeScorer hooks
    def init_state(self, view: LayerView) -> dict[str, torch.Tensor]:
        if view.layer_idx in self._prefill_layers or self.score is None or self.score.shape[0] != view.batch_size:
            self._reset()
        self._prefill_layers.add(view.layer_idx)
        self._prompt_seen = view.seen
        self._add(view, check_attention(view, None, "h2o_elastic_code"))
        return {}

    def observe(self, view: LayerView) -> None:
        if self.score is None:
            raise RuntimeError("h2o_elastic_code: no prefill state (init_state was not called)")
        if view.seen != self._step_seen:
            self._new_step(view)  # reads the previous step's _step_seen
            self._step_seen = view.seen
        self._add(view, check_attention(view, 1, "h2o_elastic_code"))

    def drop_scores(self, view: LayerView) -> torch.Tensor:
        if self._snapshot is None:
            raise RuntimeError("h2o_elastic_code: drop_scores before observe")
        rank = view.rank()[:, 0]
        held = view.held()[:, 0]
        snap = _pad(self._snapshot, view.num_slots)
        base = snap.gather(1, rank)
        bulk = view.seen == self._prompt_seen + 1  # the first decode step: the prompt's compression
        out = torch.full_like(base, INF)
        for b in range(view.batch_size):
            h, r = int(held[b]), rank[b]
            if bulk:
                # candidates: cache indices [0, h - 2), the prompt but its last token (index h - 1 is the new token)
                cand = max(h - 2, 0)
                if self.params.quirk_rank_by_index:
                    order = snap[b, :cand].argsort(stable=True)  # order[i]: index of the i-th lowest score
                    val = torch.full_like(snap[b], INF)
                    val[:cand] = order.to(torch.float32)
                    out[b] = val.gather(0, r)
                else:
                    out[b] = torch.where(r < cand, base[b], INF)
            else:
                lo, hi = self.params.start_size, h - 1
                out[b] = torch.where((r >= lo) & (r < hi), base[b], INF)
        out = out.masked_fill(~view.valid[:, 0], INF)
        return out[:, None, :]


def _pad(t: torch.Tensor, n: int) -> torch.Tensor:
    """``t`` ``[B, N]`` zero-padded to at least ``n`` columns."""
    if t.shape[1] >= n:
        return t
    return torch.cat([t, t.new_zeros(t.shape[0], n - t.shape[1])], dim=1)


# ===================================================================================================== registration


@hookimpl
def kvpolicy_parts() -> list[PartSpec]:
    return [
        PartSpec(
            name="h2o",
            kind="encode",
            params=H2OParams,
            factory=H2OScorer,
            summary="H2O: attention accumulated from every prompt query (heavy hitters) + a recent window",
            provides=frozenset({"scores", "per_head_scores"}),  # per-head with per_head=true
        ),
        PartSpec(
            name="h2o",
            kind="decode",
            params=H2OParams,
            factory=H2ODecode,
            summary="H2O: add each step's attention to the accumulator, evict the lowest outside the recent window",
            provides=frozenset({"scores", "per_head_scores", "cumulative_attention"}),
        ),
        PartSpec(
            name="h2o_elastic_code",
            kind="decode",
            params=H2OElasticCodeParams,
            factory=H2OElasticCode,
            summary="H2O as in the Elastic Cache authors' code: one score averaged over heads and layers, no window",
        ),
    ]


@hookimpl
def kvpolicy_presets() -> list[PresetSpec]:
    return [
        PresetSpec(
            name="h2o",
            summary="H2O: heavy hitters per kv head + 32 recent tokens, at prefill and while decoding, half removed",
            policy={"encode": {"name": "h2o"}, "decode": {"name": "h2o"}, "reducer": {"name": "evict"}, "ratio": 0.5},
        ),
        PresetSpec(
            name="h2o_elastic_code",
            summary="the Elastic Cache authors' H2O baseline (layer- and head-averaged scores, their quirks), ratio 0.2",
            policy={
                "decode": {"name": "h2o_elastic_code", "start_size": 1},
                "reducer": {"name": "evict"},
                "ratio": 0.2,
                "reference_quirks": {
                    "rank_by_index": True,
                    "misaligned_scores": True,
                    "drop_after_attention": True,
                    "compressed_positions": True,
                },
            },
        ),
    ]
