"""Where scores come from: the attention functions kvpolicy registers with transformers.

``kvpolicy`` (SDPA outputs) and ``kvpolicy_eager`` (eager outputs) are registered through ``AttentionInterface``
with a mask function under the same name (``AttentionMaskInterface``; without one ``create_causal_mask`` returns
``None``). For each attention call that follows a :class:`~kvpolicy.core.layer.PolicyLayer` update they

1. learn which new tokens are padding (from transformers' mask, whose last query row sees every real column);
2. produce the outputs: with transformers' own mask and attention function while the layer is uncompressed
   ("pristine", so a policy that drops nothing reproduces the plain cache bit for bit), otherwise through the layer's
   storage under the engine's per-slot mask (:mod:`kvpolicy.core.masks`), attending per kv-head group (keys are never
   repeated to query heads);
3. compute the statistics the policy declared (:class:`~kvpolicy.core.policy.AttentionStat`) in query chunks
   (:mod:`kvpolicy.core.kernels`) and the query statistics (:class:`~kvpolicy.core.policy.QueryStat`,
   :mod:`kvpolicy.core.querystats`), and
4. hand them to the layer, which compresses right away if its stage asks for it.

A probe chunk (:mod:`kvpolicy.core.probe`) takes a short path: transformers' own attention over the prompt and the
chunk, then the chunk's statistic (:meth:`~kvpolicy.core.layer.PolicyLayer.finish_probe`).

This module only chooses the path; the tensor work is in :mod:`kvpolicy.core.kernels`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask
from transformers.models.llama.modeling_llama import eager_attention_forward

from .kernels import attention_received, attention_with_received, masked_attention_with_received
from .layer import PolicyLayer, take_active_layer
from .policy import AttentionStat, QueryStat
from .probe import next_positions
from .querystats import QueryStats, query_statistics

__all__ = ["EAGER", "FUSED_DECODE_MAX_QUERIES", "SDPA", "register"]

#: steps of at most this many queries on a compressed layer compute outputs and statistics in one block
FUSED_DECODE_MAX_QUERIES = 16

SDPA, EAGER = "kvpolicy", "kvpolicy_eager"

Stats = dict[int | None, torch.Tensor]


def _mask_fits(attention_mask: torch.Tensor | None, q: int, kv: int) -> bool:
    """Whether transformers' mask (or its absence) describes this layer's ``kv`` slots for ``q`` queries."""
    if attention_mask is not None:
        return attention_mask.shape[-1] == kv
    return q == 1 or q == kv


def _outputs(
    call: Callable[[], tuple[torch.Tensor, Any]],
    layer: PolicyLayer,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask_fits: bool,
    new_valid: torch.Tensor,
    needs: frozenset[AttentionStat],
    scaling: float,
    eager: bool,
    stats: Stats,
) -> torch.Tensor:
    """The step's outputs, by the cheapest path that keeps the engine's guarantees; a path that also yields the
    whole-step statistics stores them in ``stats``. ``call`` runs transformers' own attention function."""
    q = query.shape[2]
    whole = [need for need in needs if need.window is None or need.window >= q]
    if layer.pristine and mask_fits and whole and layer.prefill_drops():
        # an uncompressed layer about to be compressed: outputs and statistics from one pass over the keys
        out, received = attention_with_received(
            query, key, value, layer.valid, new_valid, scaling, layer.seen - layer.length, layer.seen - q
        )
    elif layer.pristine and mask_fits:
        return call()[0]
    elif whole and q <= FUSED_DECODE_MAX_QUERIES:
        out, received = masked_attention_with_received(query, key, value, layer.mask(q), new_valid, scaling)
    else:
        return layer.attend(query, scaling, eager)
    for need in whole:
        stats[need.window] = received
    return out


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


def _policy_attention(base: Callable, eager: bool) -> Callable:
    def attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
        layer: PolicyLayer | None = take_active_layer(getattr(module, "layer_idx", None))
        if layer is None:  # not a policy layer (vision tower, sliding layer, no cache)
            return base(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
        if kwargs.get("softcap") is not None:
            raise NotImplementedError("kvpolicy: attention logit soft-capping is not supported")
        if scaling is None:
            scaling = query.shape[-1] ** -0.5
        q = query.shape[2]
        if layer.probing:
            out = base(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)[0]
            layer.finish_probe(query, key, scaling)
            return out, None
        if layer.shift is not None and layer.prefilled:
            query = layer.shift.rotate(query)
        new_valid = layer.resolve_new_tokens(attention_mask, q)
        stats: Stats = {}
        needs = layer.pending_needs()
        queries: dict[QueryStat, QueryStats] | None = None
        if needs and any(isinstance(need, QueryStat) for need in needs):
            asked = [need for need in needs if isinstance(need, QueryStat)]
            queries = _query_stats(layer, query, key.shape[1], kwargs.get("position_ids"), new_valid, asked)
        if needs and len(needs) != sum(isinstance(need, AttentionStat) for need in needs):
            if not layer.prefilled and layer.policy.probe_needs():
                layer.next_position = next_positions(kwargs.get("position_ids"), new_valid, layer.seen)
            needs = frozenset(need for need in needs if isinstance(need, AttentionStat))

        def call() -> tuple[torch.Tensor, Any]:
            return base(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)

        fits = _mask_fits(attention_mask, q, key.shape[2])
        out = _outputs(call, layer, query, key, value, fits, new_valid, needs, scaling, eager, stats)
        needs = frozenset(need for need in needs if need.window not in stats)
        if needs:
            # an uncompressed layer's slot j holds column (seen - length) + j: the causal-prefix path applies
            first_col = layer.seen - layer.length if layer.pristine else None
            cols = torch.arange(layer.seen - q, layer.seen, device=key.device)
            for need in needs:
                stats[need.window] = attention_received(
                    query, key, layer.valid, layer.positions, cols, new_valid, scaling, need.window,
                    first_slot_col=first_col,
                )
        layer.finish_step(stats, queries)
        return out, None

    return attention


def _policy_sdpa_mask(*args, **kwargs):
    return sdpa_mask(*args, **kwargs)


def register() -> None:
    """Register kvpolicy's attention and mask functions with transformers (idempotent)."""
    AttentionInterface.register(SDPA, _policy_attention(sdpa_attention_forward, eager=False))
    AttentionInterface.register(EAGER, _policy_attention(eager_attention_forward, eager=True))
    AttentionMaskInterface.register(SDPA, _policy_sdpa_mask)
    AttentionMaskInterface.register(EAGER, eager_mask)
