"""Token types (text / image / generated) of the columns a layer stores.

The cache learns them from :meth:`~kvpolicy.core.cache.PolicyCache.set_token_types`, or from the ``input_ids`` of the
forward in progress, which the hook ``kvpolicy.attach`` installs hands over through :func:`set_forward_inputs` (an
image placeholder id from the model's config marks an image position — LLaVA and Qwen2-VL expand the placeholder to
one id per image token before the forward).
"""

from __future__ import annotations

import threading

import torch

from .policy import GENERATED, IMAGE, TEXT

__all__ = ["TokenTypes", "set_forward_inputs"]

#: input_ids of the forward pass in progress on this thread (set by the hook that ``kvpolicy.attach`` installs)
_forward_inputs = threading.local()


def set_forward_inputs(input_ids: torch.Tensor | None, image_ids: frozenset[int]) -> None:
    _forward_inputs.input_ids = input_ids
    _forward_inputs.image_ids = image_ids


class TokenTypes:
    """Token types of the prompt's columns, shared by the policy layers of one cache: set explicitly (``types``) or
    read from the forward in progress."""

    def __init__(self) -> None:
        self.types: torch.Tensor | None = None  # int8 [B, S_prompt]

    def for_columns(self, cols: torch.Tensor, device: torch.device) -> torch.Tensor:
        """int8 types of logical columns ``cols [q]``, shaped ``[B or 1, 1, q]`` to broadcast over kv heads."""
        if self.types is not None:
            t = self.types.to(device)
            inside = cols < t.shape[1]
            out = torch.full((t.shape[0], cols.numel()), GENERATED, dtype=torch.int8, device=device)
            out[:, inside] = t[:, cols[inside]]
            return out[:, None, :]
        ids = getattr(_forward_inputs, "input_ids", None)
        image_ids = getattr(_forward_inputs, "image_ids", frozenset())
        if ids is not None and image_ids and ids.shape[-1] == cols.numel():
            is_image = torch.zeros_like(ids, dtype=torch.bool)
            for i in image_ids:
                is_image |= ids == i
            return torch.where(is_image, IMAGE, TEXT).to(torch.int8).to(device)[:, None, :]
        return torch.full((1, 1, cols.numel()), TEXT, dtype=torch.int8, device=device)
