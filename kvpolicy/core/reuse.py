"""One cache, one generation: the check that turns a reused :class:`~kvpolicy.core.cache.PolicyCache` into a clear
error.

transformers reads a non-empty cache passed to ``generate()`` as the beginning of the same sequences and feeds only
the prompt columns after those the cache has seen. ``DynamicCache`` does not guard this: another batch size fails
inside torch ("Sizes of tensors must match"), and a prompt no longer than what the cache has seen reaches the model
with no token ("cannot reshape tensor of 0 elements"). A policy cache raises :class:`CacheReuseError` instead, before
the model runs, naming the fix. A same-size batch whose prompt extends the cached sequences is a continuation and runs,
exactly as with ``DynamicCache``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["FRESH_CACHE_FIX", "CacheReuseError", "check_batch", "check_inputs"]

#: the fix a :class:`CacheReuseError` names
FRESH_CACHE_FIX = (
    "a PolicyCache serves one generation: pass a fresh kvpolicy.make_cache(model, policy) to each generate() call"
)


class CacheReuseError(ValueError):
    """A policy cache that already holds a generation was handed inputs of another batch size, or a forward that
    brings no new token. The message is one line and names the fix (:data:`FRESH_CACHE_FIX`)."""


def check_batch(held_rows: int, seen: int, batch: int, layer_idx: int) -> None:
    """Inside a layer's ``update()`` (a manual forward loop bypasses the hook): the batch must keep its size."""
    if batch != held_rows:
        raise CacheReuseError(
            f"kvpolicy: this cache holds {held_rows} rows (layer {layer_idx}, {seen} columns seen) and was given a "
            f"batch of {batch}; {FRESH_CACHE_FIX}"
        )


def check_inputs(policy_layers: list[Any], batch: int, new_tokens: int) -> None:
    """Before a forward (the hook ``kvpolicy.attach`` installs): raise :class:`CacheReuseError` when the cache already
    holds a generation and the forward brings a batch of another size, or no new token."""
    layer = next((x for x in policy_layers if x.is_initialized), None)
    if layer is None:
        return
    held = layer.n_tokens.shape[0]
    if batch != held:
        raise CacheReuseError(
            f"kvpolicy: this cache already holds a generation of {held} rows ({layer.seen} columns seen) and was "
            f"given a batch of {batch}; {FRESH_CACHE_FIX}"
        )
    if new_tokens == 0:
        raise CacheReuseError(
            f"kvpolicy: this cache already holds a generation ({layer.seen} columns seen) and the forward brings no "
            f"new token (generate() only feeds the prompt columns after those the cache has seen); {FRESH_CACHE_FIX}"
        )
