"""Transformers' SDPA attention call, reproduced exactly, that also returns each query's log-sum-exp.

Why: an uncompressed layer about to be compressed by a policy that ranks the prompt by the attention it receives
(H2O, Elastic Cache, ...) needs each query's softmax normaliser. On CPU, ``F.scaled_dot_product_attention`` runs the
flash kernel ``aten._scaled_dot_product_flash_attention_for_cpu``, which returns ``(output, logsumexp)``; SDPA keeps
the output and drops the log-sum-exp. Calling that kernel directly with the arguments SDPA would pass it gives the
same output bit for bit plus the log-sum-exp, so the layer's outputs (and every later hidden state) equal the full
cache's, and the statistics need no second softmax (:func:`kvpolicy.core.lse.received_from_lse`).

:func:`sdpa_with_lse` follows ``transformers.integrations.sdpa_attention.sdpa_attention_forward`` (transformers 5.23)
step by step — grouped-query handling (``enable_gqa`` where transformers uses it, ``repeat_kv`` otherwise), the
``is_causal`` rule, the key slicing of a causal call, the mask — and turns a boolean mask into the additive float
mask SDPA itself makes of it. It asks torch which backend SDPA would pick for these exact arguments
(``torch._fused_sdp_choice``) and answers ``None`` unless that is the CPU flash kernel: other devices (on CUDA the
flash kernel has a log-sum-exp too, but its path cannot be tested here), dropout, position biases, paged caches,
single-query (decode) calls, tracing, and shapes or dtypes the kernel refuses. The caller then keeps its other path.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn.attention import SDPBackend
from transformers.integrations.sdpa_attention import repeat_kv, use_gqa_in_sdpa
from transformers.utils.import_utils import is_torchdynamo_compiling

__all__ = ["sdpa_with_lse"]


def _reproducible(query: torch.Tensor, dropout: float, kwargs: dict[str, Any]) -> bool:
    """Whether this call is one the CPU flash kernel can reproduce (before looking at shapes)."""
    if query.device.type != "cpu" or dropout != 0.0 or query.shape[2] < 2:
        return False
    if kwargs.get("position_bias") is not None or kwargs.get("cache") is not None:
        return False
    if torch.jit.is_tracing() or is_torchdynamo_compiling():
        return False
    return not (torch.is_grad_enabled() and query.requires_grad)


def sdpa_with_lse(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(outputs [B, q, Hq, Dv], lse [B, Hq, q] float32)`` equal to what transformers' ``sdpa_attention_forward``
    returns for the same arguments (outputs bit for bit), or ``None`` when this call would not run SDPA's CPU flash
    kernel (see the module docstring). ``lse`` is the natural log-sum-exp of each query's scaled logits under the
    mask; for a query that sees no key it is 0 (such a row's output is 0)."""
    if not _reproducible(query, dropout, kwargs):
        return None
    q_length = query.shape[2]
    enable_gqa = False
    if hasattr(module, "num_key_value_groups") and module.num_key_value_groups > 1:
        if use_gqa_in_sdpa(attention_mask, key, value):
            enable_gqa = True
        else:  # transformers' single-query pack_gqa branch is excluded above (q_length >= 2)
            key = repeat_kv(key, module.num_key_value_groups)
            value = repeat_kv(value, module.num_key_value_groups)
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    is_causal = bool(attention_mask is None and is_causal)
    if is_causal and key.shape[2] > q_length:
        key, value = key[:, :, :q_length, :], value[:, :, :q_length, :]
    choice = torch._fused_sdp_choice(
        query, key, value, attention_mask, dropout, is_causal, scale=scaling, enable_gqa=enable_gqa
    )
    if choice != int(SDPBackend.FLASH_ATTENTION):
        return None
    mask = attention_mask
    if mask is not None and mask.dtype == torch.bool:  # what SDPA does with a boolean mask before its kernels
        mask = torch.zeros(mask.shape, dtype=query.dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query, key, value, 0.0, is_causal, attn_mask=mask, scale=scaling
    )
    out = out.reshape(out.shape[0], -1, q_length, value.shape[-1]).transpose(1, 2).contiguous()
    return out, lse
