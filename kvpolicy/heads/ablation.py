"""Streaming one kv head at a time: an attention function that hides the middle of the context from chosen heads.

Why an attention function of its own rather than kvpolicy's cache: a calibration measures every kv head of the model
on the same prompt, and re-running the prompt's prefill once per head (what a compressing cache would need) costs
``layers x heads`` prefills per sample. Here the context is prefilled once into a plain ``DynamicCache``; then the
tokens after it (question and answer) are run with row ``r`` of the batch seeing, at layer ``layer[r]`` and kv head
``head[r]`` only, the context columns ``kept`` (the first ``sinks`` and last ``recent``). That is exactly what a
cache whose prefill compression streamed that one head gives those tokens (checked against the engine in
``tests/test_duo_attention.py``): the context's own hidden states are computed with full attention in both, and
the tokens after it attend to what the head kept plus each other.

Registered with transformers' ``AttentionInterface`` under :data:`ABLATION` (with ``sdpa_mask`` as its mask
function) and switched on only inside :func:`head_ablation`; every other layer, and every row of a restricted layer
that is not restricted, attends as SDPA does.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ..core.kernels import grouped_attention

__all__ = ["ABLATION", "Restriction", "head_ablation", "restricted"]

ABLATION = "kvpolicy_head_ablation"


@dataclass(frozen=True)
class Restriction:
    """Which head each batch row streams: ``layer``/``head`` int64 ``[B]`` (layer ``-1``: the row streams nothing),
    ``kept`` bool ``[C]`` the context columns a streamed head still sees, of the ``C`` context columns."""

    layer: torch.Tensor
    head: torch.Tensor
    kept: torch.Tensor

    @property
    def context(self) -> int:
        return int(self.kept.shape[0])


_ACTIVE: ContextVar[Restriction | None] = ContextVar("kvpolicy_head_ablation", default=None)


def _attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    r = _ACTIVE.get()
    layer = getattr(module, "layer_idx", None)
    rows = None if r is None or layer is None else (r.layer == layer)
    if rows is None or not bool(rows.any()):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if kwargs.get("softcap") is not None:
        raise NotImplementedError("head calibration: attention logit soft-capping is not supported")
    b, h, p, _ = key.shape
    q = query.shape[2]
    if p != r.context + q:
        raise RuntimeError(f"head calibration: layer {layer} holds {p} keys, expected {r.context} context + {q} new")
    cols = torch.arange(p, device=key.device)
    allowed = (cols[None, :] <= (r.context + torch.arange(q, device=key.device))[:, None])  # causal [q, P]
    mask = allowed.expand(b, h, q, p).clone()
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dtype == torch.bool and attention_mask.shape[-1] == p:
        mask &= attention_mask[:, :1].expand(b, 1, q, p)
    hidden = torch.zeros(p, dtype=torch.bool, device=key.device)
    hidden[: r.context] = ~r.kept.to(key.device)
    for row in rows.nonzero().flatten().tolist():
        mask[row, int(r.head[row])] &= ~hidden
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return grouped_attention(query, key, value, mask, scale, eager=False), None


def register() -> None:
    """Register the attention and mask functions (idempotent)."""
    AttentionInterface.register(ABLATION, _attention)
    AttentionMaskInterface.register(ABLATION, sdpa_mask)


def _set_implementation(model: Any, name: str) -> None:
    if "text_config" in getattr(model.config, "sub_configs", {}):
        model.set_attn_implementation({"text_config": name})
    else:
        model.set_attn_implementation(name)


@contextmanager
def head_ablation(model: Any) -> Iterator[Any]:
    """Route the model's attention through the ablation function for the duration (restored afterwards); outside a
    :func:`restricted` block it computes what SDPA computes."""
    register()
    before = model.config.get_text_config(decoder=True)._attn_implementation
    _set_implementation(model, ABLATION)
    try:
        yield model
    finally:
        _set_implementation(model, before)


@contextmanager
def restricted(restriction: Restriction) -> Iterator[Restriction]:
    """Forwards inside stream the heads ``restriction`` names (one per row)."""
    token = _ACTIVE.set(restriction)
    try:
        yield restriction
    finally:
        _ACTIVE.reset(token)
