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

from .querystats import layer_rope_parameters


class RopeShift:
    """Shift of new tokens' RoPE positions, decided once per step at the first policy layer, applied at every layer
    with that layer's own frequencies (Gemma 3 rotates its sliding-window and global layers with different bases)."""

    UNSUPPORTED = ("dynamic", "longrope")

    def __init__(self, config: Any):
        text = config.get_text_config(decoder=True)
        types = set(getattr(text, "layer_types", None) or ()) | {"full_attention"}
        #: float64 ``[D/2]`` per layer type
        self.inv_freq = {kind: self._frequencies(text, kind) for kind in sorted(types)}
        self.delta: torch.Tensor | None = None  # int64 [B]: logical - physical position of this step's tokens

    def _frequencies(self, text: Any, layer_type: str) -> torch.Tensor:
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        params, key = layer_rope_parameters(text, layer_type)
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
            return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
        inv_freq, _ = ROPE_INIT_FUNCTIONS[rope_type](text, **({"layer_type": key} if key else {}))
        return inv_freq.to(torch.float64)

    def rotate(self, x: torch.Tensor, layer_type: str = "full_attention") -> torch.Tensor:
        """Rotate ``x [B, heads, q, D]`` of a layer of ``layer_type`` back by ``delta`` positions (identity when no
        shift is set)."""
        if self.delta is None or not bool((self.delta != 0).any()):
            return x
        inv_freq = self.inv_freq.get(layer_type, self.inv_freq["full_attention"])
        angle = -self.delta.to(torch.float64)[:, None] * inv_freq.to(x.device)[None, :]  # [B, D/2]
        emb = torch.cat((angle, angle), dim=-1)[:, None, None, :]
        cos, sin = emb.cos().to(torch.float32), emb.sin().to(torch.float32)
        xf = x.to(torch.float32)
        half = xf.shape[-1] // 2
        rotated = torch.cat((-xf[..., half:], xf[..., :half]), dim=-1)
        return (xf * cos + rotated * sin).to(x.dtype)
