"""Budget accounting: what a cache holds after prefill and at the end, per row and layer, in entries and bytes, and
(multimodal prompts) split by token type.

Measured on the cache object itself (``PolicyLayer.held()``, the tensors of plain layers), not predicted from the
policy's budget, so a policy that keeps more than it says is reported as it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..core.cache import PolicyCache
from ..core.layer import PolicyLayer
from ..core.policy import GENERATED, IMAGE, TEXT
from .context import Context


def kept_by_type(cache: PolicyCache) -> torch.Tensor:
    """Entries held by token type: float ``[num_policy_layers, B, 3]`` (columns ``TEXT``, ``IMAGE``, ``GENERATED``,
    the codes of :mod:`kvpolicy.policy`), averaged over kv heads. For a multimodal prompt this is how the kept budget
    splits between text and image tokens (and tokens generated since)."""
    out = []
    for layer in cache.policy_layers:
        if not layer.is_initialized:
            continue
        per_head = []
        for h in range(layer.held().shape[1]):  # slots(h): any storage layout (a bucketed layer has no [B, H, P] view)
            valid, _, types = layer.slots(h)
            per_head.append(torch.stack([((types == code) & valid).sum(-1) for code in (TEXT, IMAGE, GENERATED)], -1))
        out.append(torch.stack(per_head).to(torch.float32).mean(0))
    if not out:
        return torch.zeros(0, 0, 3)
    return torch.stack(out)


TYPE_NAMES = ("text", "image", "generated")


def held_rows(cache: Any, ctx: Context, seen: torch.Tensor) -> torch.Tensor:
    """Entries held per row and layer (real tokens, mean over kv heads): float ``[B, num_layers]``."""
    b = seen.shape[0]
    rows = []
    for layer in cache.layers:
        if isinstance(layer, PolicyLayer):
            rows.append(layer.held().to(torch.float32).mean(-1).cpu() if layer.is_initialized else torch.zeros(b))
        else:  # a plain (full or sliding-window) layer keeps the last `physical` columns
            phys = layer.keys.shape[-2] if getattr(layer, "keys", None) is not None else 0
            rows.append(seen.clamp(max=phys).to(torch.float32))
    return torch.stack(rows, -1)


@dataclass
class Budget:
    kept: torch.Tensor  #: [B, L] entries per layer (full-attention layers and sliding ones)
    bytes: torch.Tensor  #: [B] int
    types: torch.Tensor | None  #: [B, 3]
    allocated: int  #: cache.nbytes() / DynamicCache tensor bytes for the whole batch


def measure(cache: Any, ctx: Context, seen: torch.Tensor) -> Budget:
    held = held_rows(cache, ctx, seen)
    per_entry = torch.tensor(ctx.entry_bytes[: held.shape[1]], dtype=torch.float64)
    nbytes = (held.to(torch.float64) * per_entry).sum(-1).round().to(torch.int64)
    types = None
    if isinstance(cache, PolicyCache):
        t = kept_by_type(cache)
        types = t.mean(0) if t.numel() else None
        allocated = cache.nbytes()
    else:
        allocated = sum(
            layer.keys.nbytes + layer.values.nbytes
            for layer in cache.layers
            if getattr(layer, "keys", None) is not None
        )
    return Budget(kept=held, bytes=nbytes, types=types, allocated=allocated)


__all__ = ["TYPE_NAMES", "Budget", "held_rows", "kept_by_type", "measure"]
