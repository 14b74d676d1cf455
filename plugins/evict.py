"""Eviction: the ``evict`` reducer, the ``full`` preset, and the small helpers every eviction baseline shares.

* ``evict`` (reducer): keep the ``keep`` best-scored valid entries of each row and kv head
  (:func:`kvpolicy.selection.select_top`: ties go to the older position, invalid slots are never kept), gather them
  as they are.
* ``full`` (preset): no encode and no decode scorer, ratio 0. The engine compresses nothing when a policy has no
  encode scorer and drops nothing when it has no decode scorer, so this is the uncompressed baseline run through the
  same engine (same attention function, same reports) — no "keep everything" scorer is needed.

The helpers below (sinks / recent windows by positional rank, ``protect_text``, head averaging, the cumulative
attention accumulator kept in ``view.slot_state``) are imported by the other baseline modules so that every method
states these rules once.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict

from kvpolicy.hookspecs import PartSpec, PresetSpec, hookimpl
from kvpolicy.policy import TEXT, AttentionStat, LayerView, Reduction
from kvpolicy.selection import select_top

INF = float("inf")

#: ``view.slot_state`` key of the cumulative attention received by each entry (prefill column sums plus one row per
#: decode step), kept by the decode scorers that track it (``h2o``, ``local`` with ``track_attention``) and read by
#: the ``cam`` reducer for its merge probabilities.
ATTENTION_SUM = "attention_sum"

#: the statistics behind :data:`ATTENTION_SUM`
PROMPT_ATTENTION = AttentionStat(window=None)
STEP_ATTENTION = AttentionStat(window=1)


# ===================================================================================================== helpers


def heads(t: torch.Tensor, per_head: bool) -> torch.Tensor:
    """``t`` ``[B, H, P]`` as float32, or its mean over kv heads ``[B, 1, P]`` (one decision shared by the heads).

    The engine's attention statistics are already averaged over the query heads of each kv head, and every kv head
    has the same number of query heads, so the mean over kv heads is the mean over all query heads."""
    t = t.to(torch.float32)
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
    """``scores`` as ``[B, H, P]`` with ``+inf`` where ``mask``: such entries are kept first and never dropped."""
    return full_shape(view, scores).masked_fill_(mask, INF)


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

    def observe(self, view: LayerView) -> None:
        acc = view.slot_state.get(ATTENTION_SUM)
        if acc is None:
            raise RuntimeError(f"{type(self).__name__}: the engine did not keep the '{ATTENTION_SUM}' slot state")
        att = check_attention(view, 1, type(self).__name__)
        acc.add_(heads(att, self.accumulate_per_head).masked_fill(~view.valid, 0.0))  # in place: engine storage


def build(cls: type, params_cls: type[BaseModel], params: Any, kwargs: dict[str, Any]) -> Any:
    """Validated parameters for a part constructor that accepts ``params`` (a model or a mapping) or keywords."""
    if params is None:
        return params_cls(**kwargs)
    if kwargs:
        raise TypeError(f"{cls.__name__}: pass either a params model or keyword arguments, not both")
    if isinstance(params, params_cls):
        return params
    if isinstance(params, BaseModel):
        return params_cls.model_validate(params.model_dump())
    return params_cls.model_validate(dict(params))


# ===================================================================================================== evict


class EvictParams(BaseModel):
    """The ``evict`` reducer has no parameters."""

    model_config = ConfigDict(extra="forbid")


class Evict:
    """Plain eviction (``evict`` reducer), used by every eviction baseline (H2O, TOVA, SnapKV, StreamingLLM, ...).

    Keeps, per row and kv head, the ``keep`` valid entries with the highest scores (ties to the older position;
    ``+inf`` entries first), gathered unchanged and laid out in positional order. A decode-time drop evicts (no
    ``on_drop``)."""

    def __init__(self, params: EvictParams | None = None, **kwargs: Any):
        self.params = build(Evict, EvictParams, params, kwargs)

    def reduce(self, view: LayerView, scores: torch.Tensor, keep: torch.Tensor) -> Reduction:
        return select_top(view, scores, keep)


# ===================================================================================================== registration


@hookimpl
def kvpolicy_parts() -> list[PartSpec]:
    return [
        PartSpec(
            name="evict",
            kind="reducer",
            params=EvictParams,
            factory=Evict,
            summary="keep the top-scored entries (ties to the older position), drop the rest",
            provides=frozenset(),
            requires=frozenset({"scores"}),
        ),
    ]


@hookimpl
def kvpolicy_presets() -> list[PresetSpec]:
    return [
        PresetSpec(
            name="full",
            summary="no compression: every entry kept at prefill and while decoding (the reference run)",
            policy={"reducer": {"name": "evict"}, "ratio": 0.0},
        ),
    ]
