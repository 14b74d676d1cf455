"""Where scores come from: the attention functions kvpolicy registers with transformers.

``kvpolicy`` (SDPA outputs) and ``kvpolicy_eager`` (eager outputs) are registered through ``AttentionInterface``
with a mask function under the same name (``AttentionMaskInterface``; without one ``create_causal_mask`` returns
``None``). For each attention call that follows a :class:`~kvpolicy.core.layer.PolicyLayer` update they

1. learn which new tokens are padding (from transformers' mask, whose last query row sees every real column);
2. produce the outputs: with transformers' own mask and attention function while the layer is uncompressed
   ("pristine", so a policy that drops nothing reproduces the plain cache bit for bit), otherwise through the layer's
   storage under the engine's per-slot mask (:mod:`kvpolicy.core.masks`), attending per kv-head group (keys are never
   repeated to query heads). A pristine layer whose policy declared attention statistics (or that records a prefill)
   runs the same SDPA call through the CPU flash kernel directly (:mod:`kvpolicy.core.sdpa`): outputs bit for bit
   transformers' own, plus each query's log-sum-exp — so even a policy that compresses at prefill leaves every
   prefill hidden state equal to the full cache's;
3. compute the statistics the policy declared (:class:`~kvpolicy.core.policy.AttentionStat`,
   :class:`~kvpolicy.core.policy.QueryStat`) with :func:`~kvpolicy.core.statistics.step_statistics`, the function a
   replayed prefill (:mod:`kvpolicy.core.replay`) calls too, from that log-sum-exp where there is one
   (:mod:`kvpolicy.core.lse`), keeping any the output kernel already produced;
4. on a recording cache (:mod:`kvpolicy.core.recording`), hand the layer's recorder the step's queries and
   log-sum-exp, and
5. hand the statistics to the layer, which compresses right away if its stage asks for it.

A probe chunk (:mod:`kvpolicy.core.probe`) takes a short path: transformers' own attention over the prompt and the
chunk, then the chunk's statistic (:meth:`~kvpolicy.core.layer.PolicyLayer.finish_probe`).

This module only chooses the path; the tensor work is in :mod:`kvpolicy.core.kernels` and :mod:`kvpolicy.core.lse`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask
from transformers.models.llama.modeling_llama import eager_attention_forward

from .features import refuse_attention_kwargs
from .kernels import attention_with_received, masked_attention_with_received
from .layer import PolicyLayer, take_active_layer
from .policy import AttentionStat
from .sdpa import sdpa_with_lse
from .statistics import Stats, step_statistics

__all__ = ["EAGER", "FUSED_DECODE_MAX_QUERIES", "SDPA", "register"]

#: steps of at most this many queries on a compressed layer compute outputs and statistics in one block
FUSED_DECODE_MAX_QUERIES = 16

SDPA, EAGER = "kvpolicy", "kvpolicy_eager"


@functools.lru_cache(maxsize=64)
def _attention_stats(needs: frozenset) -> frozenset[AttentionStat]:
    """The attention statistics among ``needs``, worked out once per set (a decode step asks in every layer)."""
    return frozenset(need for need in needs if isinstance(need, AttentionStat))


def _mask_fits(attention_mask: torch.Tensor | None, q: int, kv: int) -> bool:
    """Whether transformers' mask (or its absence) describes this layer's ``kv`` slots for ``q`` queries."""
    if attention_mask is not None:
        return attention_mask.shape[-1] == kv
    return q == 1 or q == kv


def _outputs(
    call: Callable[[], tuple[torch.Tensor, Any]],
    call_lse: Callable[[], tuple[torch.Tensor, torch.Tensor] | None],
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
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The step's outputs, by the cheapest path that keeps the engine's guarantees, and each query's log-sum-exp
    where that path yields it (``None`` otherwise); a path that also yields statistics stores them in ``stats``.
    ``call`` runs transformers' own attention function; ``call_lse`` the same SDPA call with the log-sum-exp, or
    ``None`` where it cannot be reproduced (:mod:`kvpolicy.core.sdpa`)."""
    q = query.shape[2]
    plain = layer.pristine and mask_fits  # transformers' own mask describes the layer's slots
    if plain and (needs or layer.recorder is not None) and q > 1:
        # an uncompressed layer (prefill) with statistics to compute, or a prefill being recorded for replay:
        # transformers' own outputs, bit for bit, and the lse that turns each logit into a probability
        # (:func:`~kvpolicy.core.statistics.step_statistics`; a replay computes from the recorded lse the very same)
        got = call_lse()
        if got is not None:
            return got
    whole = [need for need in needs if need.window is None or need.window >= q]
    if plain and whole and layer.prefill_drops():
        # no lse (eager attention, not a CPU, a call the flash kernel refuses) and the layer is about to be
        # compressed: outputs and statistics from one pass over the keys (outputs equal up to float rounding)
        out, received = attention_with_received(
            query, key, value, layer.valid, new_valid, scaling, layer.seen - layer.length, layer.seen - q,
            sliding_window=layer.window_size,
        )
    elif plain:
        return call()[0], None
    elif whole and q <= FUSED_DECODE_MAX_QUERIES:
        real = None if layer.no_padding else new_valid  # (skips a check of new_valid per layer and step)
        out, received = masked_attention_with_received(
            query, key, value, layer.mask(q), real, scaling, layer.logit_bias
        )
    else:
        return layer.attend(query, scaling, eager), None
    for need in whole:
        stats[need.window] = received
    return out, None


def _policy_attention(base: Callable, eager: bool) -> Callable:
    def attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
        layer: PolicyLayer | None = take_active_layer(getattr(module, "layer_idx", None))
        if layer is None:  # not a policy layer (vision tower, no cache)
            return base(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
        refuse_attention_kwargs(kwargs)
        if scaling is None:
            scaling = query.shape[-1] ** -0.5
        q = query.shape[2]
        if layer.probe.active:
            out = base(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)[0]
            layer.finish_probe(query, key, scaling)
            return out, None
        if layer.shift is not None and layer.prefilled:
            query = layer.shift.rotate(query, layer.layer_type)
        new_valid = layer.resolve_new_tokens(attention_mask, q)
        needs = layer.pending_needs()
        attention_needs = _attention_stats(needs)

        def call() -> tuple[torch.Tensor, Any]:
            return base(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)

        def call_lse() -> tuple[torch.Tensor, torch.Tensor] | None:
            if eager:
                return None
            return sdpa_with_lse(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)

        fits = _mask_fits(attention_mask, q, key.shape[2])
        known: Stats = {}
        out, lse = _outputs(
            call, call_lse, layer, query, key, value, fits, new_valid, attention_needs, scaling, eager, known
        )
        position_ids = kwargs.get("position_ids")
        if len(known) == len(needs):  # the output kernel gave every statistic (a decode step's attention): none left
            stats, queries = known, None
        else:
            stats, queries = step_statistics(layer, query, key, new_valid, needs, scaling, position_ids, known, lse)
        if layer.recorder is not None:
            layer.recorder(query=query, position_ids=position_ids, scaling=scaling, lse=lse)
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
