"""The "positions from the compressed length" switch (a quirk of the Elastic Cache authors' code).

Under transformers 4.31 a new token's position id was the cache's *physical* length, so after compression new tokens
were placed closer to the prompt than they are. kvpolicy gives logical positions by default; with
``CachePolicy.compressed_positions`` it reproduces the quirk exactly by re-rotating the new token's query and key by
``-(logical - physical)`` positions — RoPE rotations compose additively, so this equals encoding the token at the
physical length, without touching the model's code.
"""

from __future__ import annotations

from typing import Any

import torch


class RopeShift:
    """Shift of new tokens' RoPE positions, decided once per step at the first policy layer, applied at every layer."""

    UNSUPPORTED = ("dynamic", "longrope")

    def __init__(self, config: Any):
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        text = config.get_text_config(decoder=True)
        params = getattr(text, "rope_parameters", None) or {}
        rope_type = params.get("rope_type", "default")
        if rope_type in self.UNSUPPORTED:
            raise ValueError(
                f"compressed_positions: rope_type {rope_type!r} is not supported; it needs rotary frequencies that do "
                "not depend on the sequence length"
            )
        # M-RoPE (Qwen2-VL) is fine: a generated token has the same position on all three axes, so shifting it by
        # delta rotates every frequency band by the same angle as 1-D RoPE would
        if rope_type == "default":
            dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
            base = params["rope_theta"]
            self.inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
        else:
            inv_freq, _ = ROPE_INIT_FUNCTIONS[rope_type](text)
            self.inv_freq = inv_freq.to(torch.float64)
        self.delta: torch.Tensor | None = None  # int64 [B]: logical - physical position of this step's tokens

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """Rotate ``x [B, heads, q, D]`` back by ``delta`` positions (identity when no shift is set)."""
        if self.delta is None or not bool((self.delta != 0).any()):
            return x
        angle = -self.delta.to(torch.float64)[:, None] * self.inv_freq.to(x.device)[None, :]  # [B, D/2]
        emb = torch.cat((angle, angle), dim=-1)[:, None, None, :]
        cos, sin = emb.cos().to(torch.float32), emb.sin().to(torch.float32)
        xf = x.to(torch.float32)
        half = xf.shape[-1] // 2
        rotated = torch.cat((-xf[..., half:], xf[..., :half]), dim=-1)
        return (xf * cos + rotated * sin).to(x.dtype)
