"""CaM (Cache Merging): evicted values are merged into the following kept entries instead of being discarded.

Zhang et al., ICML 2024, "CaM: Cache Merging for Memory-efficient LLMs Inference" (PMLR 235:58840-58850; authors'
code github.com/zyxxmu/cam, ``cam_hf/utils_lm_eval/modify_llama_cam.py: local_cam_mask``).

* ``cam`` (reducer): evicts like ``evict`` (which entries go is the scorers' choice: H2O, StreamingLLM, ...), but
  the *value* of every evicted entry ``i`` is, with probability ``p_i``, spread over the ``m`` kept entries that
  follow it: ``v_j += v_i / m``. Keys of evicted entries are dropped. At prefill this happens in ``reduce``; while
  decoding in ``on_drop``;
* preset ``cam``: H2O scorers (which keep the cumulative attention CaM's probability needs) + ``cam``, ratio 0.5.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from kvpolicy.hookspecs import PartSpec, PresetSpec, hookimpl
from kvpolicy.parts import ATTENTION_SUM, build, consumer_spec, victim_mask
from kvpolicy.core.policy import LayerView, Reduction
from kvpolicy.core.selection import select_top

PAPER = 'Zhang et al., ICML 2024, "CaM: Cache Merging for Memory-efficient LLMs Inference"'

_MASK = (1 << 63) - 1


class CamParams(BaseModel):
    """Parameters of the ``cam`` reducer."""

    model_config = ConfigDict(extra="forbid")

    merge_budget: int | None = Field(
        default=None,
        ge=1,
        le=1 << 20,
        description="m: an evicted value is added, divided by m, to the next m kept entries (mass past the newest "
        "entry is lost, as in the authors' code); null: to every following kept entry, divided by their count "
        "(the authors' StreamingLLM code, where m is the whole recent window)",
    )
    probability: Literal["attention", "always"] = Field(
        default="attention",
        description="attention: merge with probability min(1, A_i / ref) (Bernoulli), A = cumulative attention "
        "received; always: merge every evicted value (deterministic ablation)",
    )
    reference: Literal["mean", "max"] = Field(
        default="mean",
        description="ref of the merge probability over the entry's merge targets: mean (the paper) or max (the "
        "authors' code, which takes the max over the sinks and the recent window)",
    )
    seed: int = Field(default=0, ge=0, le=1 << 62, description="seed of the Bernoulli draws (same seed: same cache)")


class CamReducer:
    """CaM reducer (``cam``).

    Zhang et al., ICML 2024, "CaM: Cache Merging for Memory-efficient LLMs Inference": evicting an entry perturbs
    the attention output; CaM reduces the perturbation by merging the evicted entry's value into the values of the
    entries that follow it, and decides *whether* to merge by sampling: ``mask_i ~ Bernoulli(p_i)`` with ``p_i =
    clamp(A_i / ref_i, 0, 1)``, ``A`` the cumulative attention each entry received (H2O's statistic). The keys of
    evicted entries are dropped; kept keys are unchanged.

    Our reading, and the choices made where the paper and its code leave room:

    * **targets**: the ``merge_budget`` (``m``) *kept* entries that follow the evicted one in positional order, per
      kv head; each receives ``v_i / m`` (mass for targets past the newest entry is lost, as in the authors' code;
      ``merge_budget: null`` spreads over all following kept entries, each getting ``v_i / count`` — what the
      authors' StreamingLLM code does, where ``m`` is the recent window and every following entry is in it).
      Evicted entries are never targets, so a bulk eviction (prefill) equals evicting the victims one by one, oldest
      first, into the survivors (no cascading through entries evicted in the same step);
    * **probability**: ``A`` is read from the prefill statistic ``view.attention[None]`` (column sums over the
      prompt) in ``reduce``, and from ``view.slot_state['attention_sum']`` (kept by the ``h2o`` decode scorer, or
      ``local`` with ``track_attention: true``) in ``on_drop``. ``ref`` is the mean of ``A`` over the merge targets
      (the paper's Eq. 14 as we read it) or their max (the authors' code takes the max over the sinks and the recent
      window, the victim included). The authors average ``A`` over the queries instead of summing it; the ratio is
      the same. ``probability: always`` merges every victim;
    * **randomness**: one uniform draw per slot from a generator seeded with ``(seed, layer, columns seen)``, so runs
      are reproducible;
    * the authors' code simulates the eviction with attention masks during a full forward pass (their attention
      weights are those of the masked, streaming attention); kvpolicy really evicts, so ``A`` is the attention of the
      cache as it was.
    """

    def __init__(self, params: CamParams | None = None, **kwargs: Any):
        self.params = build(CamReducer, CamParams, params, kwargs)

    # ------------------------------------------------------------------ Reducer
    def reduce(self, view: LayerView, scores: torch.Tensor, keep: torch.Tensor) -> Reduction:
        red = select_top(view, scores, keep)
        kept = torch.zeros_like(view.valid).scatter_(-1, red.index, red.valid) & view.valid
        victims = view.valid & ~kept
        if not bool(victims.any()):
            return red
        att = view.attention.get(None) if self.params.probability == "attention" else None
        if self.params.probability == "attention" and att is None:
            raise RuntimeError(
                "cam: probability='attention' needs the prompt's cumulative attention at prefill, which no part "
                "declared: use an encode scorer that needs AttentionStat(None) (h2o), a decode scorer that seeds "
                "from it (h2o, or local with track_attention: true), or probability: always"
            )
        values = self.merge(view, victims, kept, att, stage_salt=1)
        idx = red.index[..., None].expand(*red.index.shape, values.shape[-1])
        return Reduction(index=red.index, valid=red.valid, values=values.gather(2, idx))

    def on_drop(
        self, view: LayerView, victims: torch.Tensor, victim_valid: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        vmask = victim_mask(view, victims, victim_valid)
        if not bool(vmask.any()):
            return None
        att = None
        if self.params.probability == "attention":
            att = view.slot_state.get(ATTENTION_SUM)
            if att is None:
                raise RuntimeError(
                    "cam: probability='attention' needs the cumulative attention of every entry while decoding "
                    "(slot state 'attention_sum'): use the h2o decode scorer, local with track_attention: true, "
                    "or probability: always"
                )
        values = self.merge(view, vmask, view.valid & ~vmask, att, stage_salt=2)
        return view.keys, values

    # ------------------------------------------------------------------ the merge
    def uniforms(self, view: LayerView, stage_salt: int) -> torch.Tensor:
        """The Bernoulli draws, one per slot: float32 ``[B, H, P]`` (merge iff ``u < p``)."""
        key = (self.params.seed * 1_000_003 + stage_salt) * 1_000_033 + view.layer_idx
        key = (key * 1_000_037 + view.seen) & _MASK
        g = torch.Generator(device="cpu").manual_seed(key)
        u = torch.rand(view.batch_size, view.num_heads, view.num_slots, generator=g, dtype=torch.float32)
        return u.to(view.keys.device)

    def merge(
        self,
        view: LayerView,
        victims: torch.Tensor,
        targets: torch.Tensor,
        attention: torch.Tensor | None,
        stage_salt: int,
    ) -> torch.Tensor:
        """Values ``[B, H, P, D]`` after merging every ``victims`` slot into the following ``targets`` slots."""
        prm = self.params
        b, h, p = view.valid.shape
        order = view.order()  # positional order, invalid last
        vic = victims.gather(-1, order)
        tgt = targets.gather(-1, order)
        d = view.values.shape[-1]
        vals = view.values.gather(2, order[..., None].expand(b, h, p, d)).to(torch.float64)

        ctgt = tgt.to(torch.long).cumsum(-1)  # targets at or before each sorted position
        total = ctgt[..., -1:]  # targets per row
        start = ctgt  # a victim's first target has target-rank ctgt (the victim is not a target)
        following = total - start
        if prm.merge_budget is None:
            m = following
        else:
            m = torch.full_like(following, prm.merge_budget)
        has = vic & (following > 0)

        # merge decision
        if prm.probability == "always":
            weight = has.to(torch.float64)
        else:
            assert attention is not None
            a = attention.to(torch.float64).expand(b, h, p).gather(-1, order)
            # A of the targets in target-rank order (the r-th target at index r; non-targets to a dump column)
            rank_of = (ctgt - 1).clamp(min=0)
            a_t = torch.zeros(b, h, p + 1, dtype=torch.float64, device=a.device)
            a_t.scatter_(-1, torch.where(tgt, rank_of, p), torch.where(tgt, a, 0.0))
            a_t = a_t[..., :p]
            span = torch.minimum(m, following).clamp(min=1)
            if prm.reference == "mean":
                csum = torch.cat([a_t.new_zeros(b, h, 1), a_t.cumsum(-1)], dim=-1)  # [B, H, P + 1]
                s0 = start.clamp(max=p)
                s1 = (start + span).clamp(max=p)
                ref = (csum.gather(-1, s1) - csum.gather(-1, s0)) / span.to(torch.float64)
            else:
                ref = self._window_max(a_t, total, start, prm.merge_budget)
            ratio = torch.where(ref > 0, a / ref.clamp(min=torch.finfo(torch.float64).tiny), (a > 0).to(a.dtype))
            prob = ratio.clamp(0.0, 1.0)
            u = self.uniforms(view, stage_salt).to(torch.float64).gather(-1, order)
            weight = (has & (u < prob)).to(torch.float64)

        # difference array over target ranks: victim i adds w_i v_i / m_i to target ranks [start_i, start_i + m_i)
        contrib = vals * (weight / m.clamp(min=1).to(torch.float64))[..., None]
        delta = torch.zeros(b, h, p + 1, d, dtype=torch.float64, device=vals.device)
        s0 = torch.where(has, start, p).clamp(max=p)
        s1 = torch.where(has, start + m, p).clamp(max=p)
        delta.scatter_add_(2, s0[..., None].expand(b, h, p, d), contrib)
        delta.scatter_add_(2, s1[..., None].expand(b, h, p, d), -contrib)
        added = delta.cumsum(2)  # [B, H, P + 1, D]: what the target of each rank receives
        rank_of = (ctgt - 1).clamp(min=0)
        recv = added.gather(2, rank_of[..., None].expand(b, h, p, d))
        merged_sorted = torch.where(tgt[..., None], vals + recv, vals).to(view.values.dtype)
        out = torch.empty_like(view.values)
        out.scatter_(2, order[..., None].expand(b, h, p, d), merged_sorted)
        return out

    @staticmethod
    def _window_max(a_t: torch.Tensor, total: torch.Tensor, start: torch.Tensor, m: int | None) -> torch.Tensor:
        """For every sorted position, the max of ``a_t`` over target ranks ``[start, start + m) ∩ [0, total)``
        (``m=None``: up to ``total``); ``-inf`` where that range is empty."""
        b, h, p = a_t.shape
        x = torch.where(torch.arange(p, device=a_t.device) < total, a_t, float("-inf"))
        if m is None:
            win = x.flip(-1).cummax(-1).values.flip(-1)  # win[r] = max x[r:]
        else:
            k = min(m, p)
            padded = F.pad(x.reshape(b * h, 1, p), (0, k - 1), value=float("-inf"))
            win = F.max_pool1d(padded, kernel_size=k, stride=1).reshape(b, h, p)  # win[r] = max x[r : r + k]
        return win.gather(-1, start.clamp(max=p - 1))


@hookimpl
def kvpolicy_parts() -> list[PartSpec]:
    return [
        consumer_spec(
            name="cam",
            kind="reducer",
            params=CamParams,
            factory=CamReducer,
            summary="CaM: evict, but merge each evicted value into the following kept entries (Bernoulli by attention)",
        ),
    ]


@hookimpl
def kvpolicy_presets() -> list[PresetSpec]:
    return [
        PresetSpec(
            name="cam",
            summary="CaM on H2O: heavy hitters + recent window, evicted values merged into following entries, half "
            "removed",
            policy={"encode": {"name": "h2o"}, "decode": {"name": "h2o"}, "reducer": {"name": "cam"}, "ratio": 0.5},
        ),
    ]
