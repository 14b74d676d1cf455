"""The statistics of one attention step, computed the same way wherever the step's inputs come from.

A policy declares what its parts read (:class:`~kvpolicy.core.policy.AttentionStat`,
:class:`~kvpolicy.core.policy.QueryStat`); :func:`step_statistics` computes them from the step's queries and the
layer's keys. Two callers share it, so that a prefill replayed from a recording (:mod:`kvpolicy.core.replay`) hands
its parts the very numbers the direct path would: the registered attention function (:mod:`kvpolicy.core.attention`),
after the outputs, and the replay, from the recorded queries. Only the outputs are the attention function's own
business (which kernel produces them, and whether that kernel already yielded some statistics).

:func:`received_per_query_head` is the whole-model view's statistic (``ModelView.head_attention``): the attention each
key receives from every query of an uncompressed layer, per query head rather than averaged over a kv-head group.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from .kernels import MIN_CHUNK_ROWS, STATS_CHUNK_ELEMENTS, attention_received, causal_prefix_blocks
from .lse import received_from_lse
from .policy import AttentionStat, ProbeStat, QueryStat
from .probe import next_positions
from .querystats import QueryStats, query_statistics

if TYPE_CHECKING:
    from .layer import PolicyLayer

__all__ = ["Stats", "received_per_query_head", "step_statistics"]

#: attention statistics of one step by window (``None``: every query of the step), float32 ``[B, H, P]`` each
Stats = dict[int | None, torch.Tensor]


def _query_stats(
    layer: PolicyLayer,
    query: torch.Tensor,
    heads: int,
    position_ids: Any,
    new_valid: torch.Tensor,
    needs: list[QueryStat],
) -> dict[QueryStat, QueryStats]:
    """The declared query statistics of this step. RoPE positions are the ``position_ids`` the model used (a left-padded
    row's first real token may sit at 0); without them, the columns, which is what transformers derives by default."""
    b, _, q, _ = query.shape
    if isinstance(position_ids, torch.Tensor) and position_ids.dim() == 2:
        positions = position_ids.to(query.device).expand(b, q)
    else:
        positions = torch.arange(layer.seen - q, layer.seen, device=query.device).expand(b, q)
    before = layer.n_tokens - new_valid.sum(-1)
    assert layer.rope is not None  # set by PolicyCache whenever the policy declares a QueryStat
    return {
        need: query_statistics(
            query, positions, new_valid, heads, layer.rope, need.window, need.covariance, need.skip_first, before
        )
        for need in needs
    }


def step_statistics(
    layer: PolicyLayer,
    query: torch.Tensor,
    key: torch.Tensor,
    new_valid: torch.Tensor,
    needs: frozenset,
    scaling: float,
    position_ids: Any = None,
    known: Stats | None = None,
    lse: torch.Tensor | None = None,
) -> tuple[Stats, dict[QueryStat, QueryStats] | None]:
    """The statistics ``needs`` of the step whose ``query [B, Hq, q, D]`` just attended to ``key [B, H, P, D]`` (the
    layer's stored keys, this step's included) after :meth:`~kvpolicy.core.layer.PolicyLayer.update` and
    :meth:`~kvpolicy.core.layer.PolicyLayer.mark_new_tokens`, ``new_valid`` bool ``[B, q]``. ``known``: windows the
    output kernel already computed (kept as they are). ``position_ids``: the RoPE positions the model used (query
    statistics only).

    Returns ``(attention, queries)`` as :meth:`~kvpolicy.core.layer.PolicyLayer.finish_step` takes them
    (``queries`` is ``None`` when no :class:`QueryStat` is declared).

    ``lse`` (float32 ``[B, Hq, q]``): the log-sum-exp of each query's softmax where the kernel that produced the
    outputs returned it (:func:`~kvpolicy.core.sdpa.sdpa_with_lse` on an uncompressed layer): then each probability is
    ``exp(q.k * scale - lse)`` (:func:`~kvpolicy.core.lse.received_from_lse`), no second softmax. A replay passes the
    recorded lse, so it computes the very numbers the direct path did.

    A :class:`ProbeStat` is not computed here: the probe runs once the prefill forward is over
    (:mod:`kvpolicy.core.probe`). What the prefill step gives it is where its RoPE positions continue
    (``layer.next_position``, from ``position_ids`` as for the query statistics).
    """
    if not layer.prefilled and any(isinstance(need, ProbeStat) for need in needs):
        layer.next_position = next_positions(position_ids, new_valid, layer.seen)
    stats: Stats = dict(known or {})
    asked = [need for need in needs if isinstance(need, QueryStat)]
    queries = _query_stats(layer, query, key.shape[1], position_ids, new_valid, asked) if asked else None
    rest = [need for need in needs if isinstance(need, AttentionStat) and need.window not in stats]
    if rest:
        q = query.shape[2]
        # an uncompressed layer's slot j holds column (seen - length) + j: the causal-prefix path applies
        first_col = layer.seen - layer.length if layer.pristine else None
        cols = torch.arange(layer.seen - q, layer.seen, device=key.device)
        for need in rest:
            if lse is not None and first_col is not None:
                stats[need.window] = received_from_lse(
                    query, key, lse, layer.valid, new_valid, scaling, need.window, first_col, layer.seen - q,
                    sliding_window=layer.window_size,
                )
            else:
                stats[need.window] = attention_received(
                    query, key, layer.valid, layer.positions, cols, new_valid, scaling, need.window,
                    first_slot_col=first_col, sliding_window=layer.window_size,
                    bias=None if layer.pristine else layer.logit_bias,
                )
    return stats, queries


def received_per_query_head(
    query: torch.Tensor,
    key: torch.Tensor,
    valid: torch.Tensor,
    query_valid: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """float32 ``[B, Hq, P]``: the attention each key of an uncompressed prefill receives from every real query, per
    query head (:func:`~kvpolicy.core.kernels.attention_received` averages the heads of a group instead). Same
    probability blocks (:func:`~kvpolicy.core.kernels.causal_prefix_blocks`), so the same memory bound.

    ``query [B, Hq, q, D]`` at the last ``q`` of the ``P`` slots of ``key [B, H, P, D]`` (slot ``j`` holds column
    ``j``), ``valid [B, H, P]``, ``query_valid [B, q]``."""
    b, hq, q, _ = query.shape
    h, p = key.shape[1], key.shape[2]
    total = torch.zeros(b, h, hq // h, p, dtype=torch.float32, device=key.device)
    blocks = causal_prefix_blocks(
        query, key.to(torch.float32), valid, query_valid, scaling, 0, p - q, STATS_CHUNK_ELEMENTS, MIN_CHUNK_ROWS
    )
    for _, _, kmax, probs in blocks:
        total[..., :kmax] += probs.sum(dim=3)
    return total.view(b, hq, p)
