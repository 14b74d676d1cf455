"""Elastic Cache's decode rule (``distance_offset``): drop the entry at an index frozen at the end of prefill.

Part of the Elastic Cache plugin (registered and documented in :mod:`kvpolicy_plugins.elastic`, docs/elastic.md):
Liu et al., ECCV 2024, "Efficient Inference of Vision Instruction-Following Models with Elastic Cache". Kept apart
from the prefill parts because it shares nothing with them but the policy's sinks (``view.sinks``).
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from kvpolicy.core.policy import AttentionStat, LayerView

__all__ = ["DROP_INDEX_KEY", "DistanceOffset", "DistanceOffsetParams"]

#: ``layer_state`` key under which ``distance_offset`` stores the frozen drop index (int64 ``[B, H]``)
DROP_INDEX_KEY = "elastic.drop_index"
#: ``layer_state`` key of the drop index computed from the engine's ``prefill_kept``: (scorer, that tensor, sinks, index)
_INDEX_MEMO = "elastic.drop_index_memo"


class DistanceOffsetParams(BaseModel):
    """Parameters of the ``distance_offset`` decode scorer."""

    model_config = ConfigDict(extra="forbid")

    offset: int = Field(
        default=-25,
        ge=-(1 << 20),
        le=1 << 20,
        description="drop index: prefill_kept + 1 + offset for offset < 0 (frozen at the end of prefill), the index "
        "itself for offset > 0; 0 is not allowed. Never below the policy's sinks (unless quirk_raw_index)",
    )
    quirk_raw_index: bool = Field(
        default=False,
        description="authors' code: the frozen index is used as their slicing uses it, with no floor at the sinks; a "
        "negative index idx with -S <= idx <= -2 (S entries held, the step's new token included) drops the |idx|-th "
        "newest entry. Where their code has no defined result (idx = -1 duplicates the cache, idx < -S drops nothing "
        "and a later call fails an assert) the paper rule applies",
    )

    @field_validator("offset")
    @classmethod
    def _non_zero(cls, v: int) -> int:
        if v == 0:
            raise ValueError("offset must be non-zero (negative: counted back from the compressed prompt's end)")
        return v


class DistanceOffset:
    """Elastic Cache's decode rule (``distance_offset``).

    Liu et al., ECCV 2024, "Efficient Inference of Vision Instruction-Following Models with Elastic Cache": in the
    output-generation stage the cache is kept at a fixed fraction of the tokens seen by dropping entries at a fixed
    distance offset, so both the initial (instruction) entries and the most recent ones are retained.

    No attention is needed. At the end of prefill the drop index of every row is frozen as
    ``prefill_kept + 1 + offset`` (``offset < 0``; default ``-25`` keeps the newest 24 prompt entries and everything
    after them as a FIFO window) or ``offset`` (``offset > 0``), and never below the policy's protected sinks
    (``view.sinks``): a short prompt would otherwise put the index on the BOS sink. Whenever the budget rule asks for
    a drop, the entry at that positional rank among the row's valid entries goes: everything before it (sinks,
    instruction anchors) is frozen. ``drop_scores`` is 0 at the index, then 1, 2, ... for the newer entries, then
    larger values for the older ones, so that dropping ``k`` entries at once equals ``k`` successive drops at the same
    index.

    When (and how many) entries go is the engine's :class:`~kvpolicy.core.policy.Budget` rule: ``decode="fraction"``
    (the paper: ``int(P - n * (1 - ratio)) >= 1``) or ``"fixed"`` (one per token once full).

    Deviations from the authors' code: their index is ``T - forget_num + distance``, which is
    ``prefill_kept + 1 + offset`` once their off-by-one prefill is reproduced (``anchor_merge.quirk_off_by_one``);
    their drop runs after the step's attention and the new tokens' RoPE positions count from the compressed length
    (engine switches ``CachePolicy.drop_after_attention`` / ``compressed_positions``). They slice with the raw index:
    below the sinks it drops a sink, and a negative one counts from the newest entry (``quirk_raw_index`` reproduces
    both where their code defines a result). An index at or past the newest entry drops the newest entry here (their
    slicing drops nothing, the cache grows and a later call fails an assert).
    """

    #: every row is scored from its own slots and the view alone (the frozen index from ``view.prefill_kept``; what
    #: ``layer_state`` holds is derived from it): the engine may score several layers at once
    stack_layers = True

    def __init__(self, params: DistanceOffsetParams | None = None, **kwargs: Any):
        self.params = params if params is not None else DistanceOffsetParams(**kwargs)
        self.needs: frozenset[AttentionStat] = frozenset()

    def drop_index(self, prefill_kept: torch.Tensor, sinks: int = 0) -> torch.Tensor:
        """The frozen drop index, int64 ``[B, H]``, from the entries held right after prefill compression: at least
        ``sinks`` (the policy's protected sinks), or the authors' raw index with ``quirk_raw_index``."""
        off = self.params.offset
        idx = torch.full_like(prefill_kept, off) if off > 0 else prefill_kept + 1 + off
        if self.params.quirk_raw_index:
            return idx
        return idx.clamp(min=max(0, sinks))

    def after_prefill(self, view: LayerView) -> None:
        kept = view.prefill_kept if view.prefill_kept is not None else view.held()
        view.layer_state[DROP_INDEX_KEY] = self.drop_index(kept, view.sinks).clone()

    def drop_scores(self, view: LayerView) -> torch.Tensor:
        # The engine keeps ``prefill_kept`` aligned with the batch rows (beam reorders, row selection); the copy in
        # layer_state is for inspection, so recompute from the engine's tensor whenever it is there.
        if view.prefill_kept is not None:
            idx = self._frozen_index(view)
        elif DROP_INDEX_KEY in view.layer_state:
            idx = view.layer_state[DROP_INDEX_KEY]
        else:
            raise RuntimeError("distance_offset: no frozen drop index (after_prefill was not called)")
        if idx.device != view.positions.device:
            idx = idx.to(view.positions.device)
        held = view.held()
        rank = view.rank()
        big = float(view.num_slots)
        backward = None
        if self.params.quirk_raw_index:
            idx, backward = _raw_target(view, idx, held)
        idx = torch.minimum(idx, (held - 1).clamp(min=0))[..., None]
        # forward (a fixed index): the entries after the victim move down onto it, so the next victim is the next newer
        # one; backward (the |idx|-th newest): the next victim is the next older one
        ahead = rank - idx if backward is None else torch.where(backward[..., None], idx - rank, rank - idx)
        ahead = ahead.to(torch.float32)
        return torch.where(ahead >= 0, ahead, big - ahead)

    def _frozen_index(self, view: LayerView) -> torch.Tensor:
        """:meth:`drop_index` of ``view.prefill_kept``, computed once per layer while that tensor stays the same
        object (the engine replaces it when rows are reordered), not at every decode step."""
        kept = view.prefill_kept
        assert kept is not None
        memo = view.layer_state.get(_INDEX_MEMO)
        if memo is None or memo[0] is not self or memo[1] is not kept or memo[2] != view.sinks:
            memo = (self, kept, view.sinks, self.drop_index(kept, view.sinks))
            view.layer_state[_INDEX_MEMO] = memo
        return memo[3]


def _raw_target(view: LayerView, idx: torch.Tensor, held: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The authors' slicing ``cat(k[:idx], k[idx+1:])`` on their cache of ``S`` entries (the step's new token
    included, whether or not it is already in ``view``): a non-negative ``idx`` is a rank as it is; ``-S <= idx <=
    -2`` is the entry at rank ``S + idx`` (``backward``: the next drop goes one older). ``idx = -1`` (their code
    duplicates the cache) and ``idx < -S`` (drops nothing, then fails) have no defined result: the paper's rule
    (the index floored at the policy's sinks) applies. Returns (rank in ``view``, backward) ``[B, H]``."""
    newest = torch.where(view.valid, view.positions, -1).amax(-1) if view.num_slots else torch.full_like(held, -1)
    incoming = (newest < view.seen - 1).to(held.dtype)  # drop before the new token is written (kvpolicy's default)
    s = held + incoming
    defined = (idx <= -2) & (idx >= -s)
    target = torch.where(defined, s + idx, torch.where(idx >= 0, idx, max(0, view.sinks)))
    return target, defined
