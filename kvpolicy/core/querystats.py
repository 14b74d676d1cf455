"""Query statistics: the mean (and covariance) of the pre-RoPE queries a layer's attention sees.

A part that models *future* queries (Expected Attention) needs the distribution of the queries, not the attention
they paid. It declares :class:`~kvpolicy.core.policy.QueryStat` in its ``needs``; the attention function then hands
this step's (post-RoPE) queries to :func:`query_statistics`, which

1. selects, per row, the last ``window`` real queries of the forward (pad queries never count; the first
   ``skip_first`` real tokens of the row never count either — kvpress drops its ``n_sink`` outlier queries);
2. un-rotates them to pre-RoPE at their own RoPE position (the ``position_ids`` the model used; left-padded rows
   start at 0 on their first real token when generate() builds them, which is why the columns are not used);
3. returns the mean ``[B, H, G, D]`` and, if asked, the biased covariance ``[B, H, G, D, D]`` (divided by the count,
   as kvpress does), indexed by kv head ``H`` and the ``G`` query heads of its group, in float32.

Memory is bounded: queries are un-rotated and summed in chunks of :data:`CHUNK` columns (two passes: mean, then the
centred outer products), so nothing larger than one chunk's queries plus the ``D x D`` sums is held. The RoPE
frequencies come from the model's config (:func:`rope_frequencies`, read once per cache, and only when a policy
declares the statistic: policies that do not pay nothing). Models with partial rotary embeddings, M-RoPE or
sequence-length-dependent RoPE are refused with one error naming the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "CHUNK",
    "QueryStats",
    "QueryStatsUnsupportedError",
    "RopeFrequencies",
    "average_rotation",
    "counted_queries",
    "layer_rope_parameters",
    "query_statistics",
    "rope_frequencies",
    "rotate",
]

#: query columns un-rotated and summed at a time
CHUNK = 1024

#: rope types whose frequencies depend on the sequence length (no fixed rotation to invert)
_LENGTH_DEPENDENT = ("dynamic", "longrope")
#: model types whose forward always builds 3-axis (M-RoPE) positions, whatever their rope_parameters say
_MROPE_MODELS = ("qwen2_vl", "qwen2_5_vl")


class QueryStatsUnsupportedError(ValueError):
    """The model's rotary embedding cannot be inverted by the engine (names the model and the reason)."""


@dataclass(frozen=True)
class RopeFrequencies:
    """The model's rotary embedding (half-split convention of transformers' ``rotate_half``): the angle of position
    ``p`` in band ``i`` is ``p * inv_freq[i]``, and cos/sin are multiplied by ``attention_scaling``."""

    inv_freq: torch.Tensor  #: float64 [D/2]
    attention_scaling: float = 1.0


@dataclass
class QueryStats:
    """One layer's query statistic for one forward, as a part sees it (``view.queries[need]``)."""

    mean: torch.Tensor  #: float32 [B, H, G, D]: pre-RoPE mean query per kv head and query head of its group
    covariance: torch.Tensor | None  #: float32 [B, H, G, D, D] (biased: divided by ``count``), or None
    count: torch.Tensor  #: int64 [B]: queries that counted per row (0: the row's mean is 0)
    next_position: torch.Tensor  #: int64 [B]: RoPE position of the row's next token (last query's + 1)
    rope: RopeFrequencies  #: to rotate the statistics to future positions (:func:`average_rotation`)


def layer_rope_parameters(text: Any, layer_type: str) -> tuple[dict, str | None]:
    """``(rope_parameters, layer_type or None)`` of one kind of layer of the text decoder config ``text``: a model
    with one RoPE per layer type (Gemma 3: ``{"full_attention": {...}, "sliding_attention": {...}}``) gives that
    type's (and the type, which transformers' RoPE functions then need); any other model its one set."""
    params = dict(getattr(text, "rope_parameters", None) or {})
    if isinstance(params.get(layer_type), dict):
        return dict(params[layer_type]), layer_type
    return params, None


def rope_frequencies(config: Any, layer_type: str = "full_attention") -> RopeFrequencies:
    """The text decoder's RoPE frequencies for its layers of ``layer_type`` (Gemma 3 rotates its sliding-window
    layers with another base than its global ones)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    text = config.get_text_config(decoder=True)
    name = type(config).__name__
    params, layer_type_key = layer_rope_parameters(text, layer_type)
    rope_type = params.get("rope_type", params.get("type", "default"))
    partial = params.get("partial_rotary_factor", getattr(text, "partial_rotary_factor", 1.0)) or 1.0
    reason = None
    if "mrope_section" in params or rope_type == "mrope" or str(text.model_type).startswith(_MROPE_MODELS):
        reason = "its M-RoPE rotates each query by three positions (temporal, height, width)"
    elif float(partial) != 1.0:
        reason = f"its rotary embedding covers only part of each head (partial_rotary_factor={partial})"
    elif rope_type in _LENGTH_DEPENDENT:
        reason = f"its rope_type {rope_type!r} depends on the sequence length"
    if reason is not None:
        raise QueryStatsUnsupportedError(
            f"kvpolicy: query statistics (QueryStat, e.g. expected_attention) cannot run on {name} "
            f"(model_type={text.model_type!r}): {reason}; supported: 1-D RoPE over the whole head"
        )
    if rope_type == "default":
        dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        inv = 1.0 / (params["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
        return RopeFrequencies(inv, 1.0)
    kwargs = {"layer_type": layer_type_key} if layer_type_key else {}
    inv, scaling = ROPE_INIT_FUNCTIONS[rope_type](text, **kwargs)
    return RopeFrequencies(inv.to(torch.float64), float(scaling))


def rotate(x: torch.Tensor, positions: torch.Tensor, rope: RopeFrequencies, inverse: bool = False) -> torch.Tensor:
    """float32 ``x [B, heads, q, D]`` rotated to ``positions`` (int64 ``[B, q]``) as transformers' RoPE does
    (``inverse``: back to pre-RoPE, dividing out ``attention_scaling``)."""
    angle = positions.to(torch.float64)[..., None] * rope.inv_freq.to(x.device)  # [B, q, D/2]
    emb = torch.cat((angle, angle), dim=-1)[:, None]  # [B, 1, q, D]
    cos, sin = emb.cos().to(torch.float32), emb.sin().to(torch.float32)
    if inverse:
        sin = -sin
    half = x.shape[-1] // 2
    turned = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    out = x * cos + turned * sin
    return out / rope.attention_scaling if inverse else out * rope.attention_scaling


def average_rotation(rope: RopeFrequencies, start: torch.Tensor, n: int) -> torch.Tensor:
    """float32 ``[B, D, D]``: the RoPE matrix ``R(p)`` averaged over positions ``start[b] .. start[b] + n - 1``, such
    that ``R(p) @ x`` is ``x`` rotated to ``p`` (times ``attention_scaling``): Expected Attention's average future
    rotation. Each 2-D band is averaged in closed form per position (no ``n x D x D`` tensor)."""
    pos = start.to(torch.float64)[:, None] + torch.arange(n, dtype=torch.float64, device=start.device)  # [B, n]
    angle = pos[..., None] * rope.inv_freq.to(start.device)  # [B, n, D/2]
    c, s = angle.cos().mean(1), angle.sin().mean(1)  # [B, D/2]
    half = c.shape[-1]
    eye = torch.eye(half, dtype=torch.float64, device=start.device)
    cd, sd = c[:, :, None] * eye, s[:, :, None] * eye  # [B, D/2, D/2] diagonal
    top = torch.cat((cd, -sd), dim=-1)  # out[:half] = c x1 - s x2
    bottom = torch.cat((sd, cd), dim=-1)  # out[half:] = s x1 + c x2
    return (torch.cat((top, bottom), dim=-2) * rope.attention_scaling).to(torch.float32)


def counted_queries(
    new_valid: torch.Tensor, window: int | None, skip_first: int, before: torch.Tensor
) -> torch.Tensor:
    """bool ``[B, q]``: the queries that count (real, among the row's last ``window`` real ones of this forward, and
    not among the row's first ``skip_first`` real tokens, ``before`` real tokens having been seen before)."""
    from_start = new_valid.cumsum(-1) + before[:, None]  # 1-based index of each real token in its row
    from_end = new_valid.flip(-1).cumsum(-1).flip(-1)  # 1 = the row's last real query
    ok = new_valid & (from_start > skip_first)
    if window is not None:
        ok &= from_end <= window
    return ok


def query_statistics(
    query: torch.Tensor,
    positions: torch.Tensor,
    new_valid: torch.Tensor,
    num_kv_heads: int,
    rope: RopeFrequencies,
    window: int | None,
    covariance: bool,
    skip_first: int = 0,
    before: torch.Tensor | None = None,
) -> QueryStats:
    """Statistics of ``query [B, Hq, q, D]`` (post-RoPE, at RoPE ``positions`` int64 ``[B, q]``) over the counted
    queries (see :func:`counted_queries`; ``before`` int64 ``[B]``: real tokens of each row before this forward)."""
    b, hq, q, d = query.shape
    g = hq // num_kv_heads
    if before is None:
        before = torch.zeros(b, dtype=torch.long, device=query.device)
    ok = counted_queries(new_valid, window, skip_first, before)
    count = ok.sum(-1)
    denom = count.clamp(min=1).to(torch.float32)[:, None, None]
    cols = ok.any(0).nonzero()
    first = int(cols[0]) if cols.numel() else q

    def chunks():
        for lo in range(first, q, CHUNK):
            hi = min(q, lo + CHUNK)
            x = rotate(query[:, :, lo:hi].to(torch.float32), positions[:, lo:hi], rope, inverse=True)
            yield x * ok[:, None, lo:hi, None], ok[:, None, lo:hi, None]

    total = query.new_zeros(b, hq, d, dtype=torch.float32)
    for x, _ in chunks():
        total += x.sum(2)
    mean = total / denom
    cov = None
    if covariance:
        cov = query.new_zeros(b, hq, d, d, dtype=torch.float32)
        for x, m in chunks():
            centred = (x - mean[:, :, None]) * m
            cov += centred.transpose(-1, -2) @ centred
        cov = (cov / denom[..., None]).view(b, num_kv_heads, g, d, d)
    last = torch.where(new_valid, positions, positions.new_full((), -1)).amax(-1)
    return QueryStats(mean.view(b, num_kv_heads, g, d), cov, count, last + 1, rope)
