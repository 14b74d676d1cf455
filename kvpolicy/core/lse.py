"""The attention each key receives, from the log-sum-exp that SDPA's flash kernel returns with its outputs.

Why: a policy that ranks the prompt by the attention it receives needs every query's softmax over its keys, which
SDPA never writes out. Recomputing the softmax costs a max, an exp and a division per logit; with each query's
log-sum-exp ``lse_i`` already known (the CPU flash kernel computes it anyway, :mod:`kvpolicy.core.sdpa`), the
probability is one subtraction and one exponential, ``p_ij = exp(s * q_i . k_j - lse_i)``, and the outputs can stay
the ones transformers' own SDPA call produces, bit for bit.

:func:`received_from_lse` is a pure function of ``(query, key, lse, validity, query validity, scaling, window,
column offsets)``, so a recorded prefill (queries, keys and lse per layer) replays to the same statistics.

Cost, per chunk of query rows: one matmul that yields the logits already shifted by ``-lse`` (three extra columns of
the queries carry it, against rows of ones under the keys), the causal mask on the diagonal block, ``exp2`` (the
matmul's alpha carries ``log2(e)``: torch's float32 ``exp2`` was measured about 5x faster than its ``exp`` on an AMD
EPYC) and a column sum — no max, no division, no broadcast pass. For a bfloat16 model the float32 matmul runs on
oneDNN's bfloat16 path, exactly (:func:`exact_bf16_matmul`). The matmul is the floor: it recomputes ``q . k``, which
the flash kernel computed but does not return. Memory: one block of at most
:data:`~kvpolicy.core.kernels.STATS_CHUNK_ELEMENTS` float32 logits (query rows times a tile of keys,
:func:`block_shape`), plus float32 copies of the keys.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from ..hardware import cpu_has_fast_bf16
from .kernels import STATS_CHUNK_ELEMENTS

__all__ = ["LSE_ROWS", "LSE_TERMS", "MIN_TILE", "block_shape", "exact_bf16_matmul", "received_from_lse"]

_LOG2E = 1.0 / math.log(2.0)
#: query rows per chunk (fewer where a row's tiles would be narrower than MIN_TILE keys)
LSE_ROWS = 128
#: narrowest column tile worth a matmul call
MIN_TILE = 256
#: bfloat16 terms that carry each query's float32 ``-lse / s`` into the matmul (their sum is exact to ~2^-24)
LSE_TERMS = 3


def _exact_terms(x: torch.Tensor) -> torch.Tensor:
    """``x [...]`` float32 as ``[..., LSE_TERMS]`` bfloat16-exact float32 terms that sum to it: operands of a matmul
    that may round to bfloat16 (:func:`exact_bf16_matmul`) lose nothing. ``-inf`` stays ``(-inf, 0, 0)``."""
    terms = []
    rest = torch.where(torch.isfinite(x), x, 0.0)
    for _ in range(LSE_TERMS):
        term = rest.to(torch.bfloat16).to(torch.float32)
        terms.append(term)
        rest = rest - term
    terms[0] = torch.where(torch.isfinite(x), terms[0], x)
    return torch.stack(terms, dim=-1)


@contextmanager
def exact_bf16_matmul(active: bool) -> Iterator[None]:
    """Let float32 matmuls run through oneDNN's bfloat16 path while ``active`` (restored on exit).

    Only for float32 operands that are exact bfloat16 values (a bfloat16 model's queries and keys, upcast): rounding
    them to bfloat16 changes nothing and the products accumulate in float32, so the result is the float32 matmul's up
    to summation order, at bfloat16 speed (measured 2x on an AMD EPYC with AVX-512 BF16; AMX does more). The switch
    is process state (torch's ``mkldnn.matmul.fp32_precision``): another thread's float32 matmul running at the same
    moment would be rounded too."""
    setting = torch.backends.mkldnn.matmul
    if not active or not cpu_has_fast_bf16():  # emulated bfloat16 (no AVX-512 BF16 or AMX) would be slower
        yield
        return
    before = setting.fp32_precision
    setting.fp32_precision = "bf16"
    try:
        yield
    finally:
        setting.fp32_precision = before


def block_shape(rows_heads: int, elements: int = STATS_CHUNK_ELEMENTS) -> tuple[int, int]:
    """``(rows, tile)`` of :func:`received_from_lse`'s blocks for ``rows_heads`` (batch x query heads): up to
    :data:`LSE_ROWS` query rows, fewer where the tile would be narrower than :data:`MIN_TILE` keys, and as many keys
    as keep the block within ``elements``."""
    rows = max(1, min(LSE_ROWS, elements // (rows_heads * MIN_TILE)))
    return rows, max(1, elements // (rows_heads * rows))


def received_from_lse(
    query: torch.Tensor,
    key: torch.Tensor,
    lse: torch.Tensor,
    valid: torch.Tensor,
    query_valid: torch.Tensor,
    scaling: float,
    window: int | None,
    first_slot_col: int,
    query_col0: int,
    rows: int | None = None,
    tile: int | None = None,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Attention each key receives from the last ``window`` queries (``None``: all), averaged over each group's query
    heads: float32 ``[B, H, P]``, the statistic of :class:`~kvpolicy.core.policy.AttentionStat`.

    ``query [B, Hq, q, D]``; ``key [B, H, P, D]`` of an uncompressed layer, slot ``j`` holding column
    ``first_slot_col + j``; queries at columns ``query_col0 ...`` (so ``P = query_col0 - first_slot_col + q``, and
    query ``i`` sees the slots up to its own column); ``lse [B, Hq, q]`` the natural log-sum-exp of each query's
    scaled, masked logits (as SDPA's flash kernel returns it); ``valid [B, H, P]`` and ``query_valid [B, q]``.
    Padding queries contribute nothing (their ``lse`` is not read) and padding keys receive nothing.

    Work goes in blocks of ``rows`` queries (all heads) times ``tile`` keys; by default (:func:`block_shape`) at most
    :data:`~kvpolicy.core.kernels.STATS_CHUNK_ELEMENTS` float32 logits (4 MiB): a block that stays in cache between
    the matmul, ``exp2`` and the sum was measured 10-15% faster at 16384 tokens than whole rows of keys. Only the keys
    at or before a block's last query are visited.

    ``sliding_window``: a sliding-window layer's window ``W`` (the lse is then the window's, as the layer's own mask
    made it): query ``i`` receives nothing from a slot ``W`` or more columns before its own, and the keys before a
    block's first query's window are not visited."""
    b, hq, q, d = query.shape
    h, p = key.shape[1], key.shape[2]
    g = hq // h
    start = 0 if window is None else max(0, q - window)
    total = torch.zeros(b * h, p, dtype=torch.float32, device=key.device)
    if p == 0 or start >= q:
        return total.view(b, h, p)
    col0 = query_col0 - first_slot_col  # slot of the first query's own column
    auto_rows, auto_tile = block_shape(b * hq)
    rows, tile = rows or auto_rows, tile or auto_tile
    # -lse enters the matmul as LSE_TERMS extra columns of the queries against rows of ones under the keys, so the
    # matmul yields q . k - lse / s at once (no pass to subtract it) and alpha = s * log2(e) makes it log2 units
    shift = _exact_terms(torch.where(query_valid[:, None, :], lse.to(torch.float32) / -scaling, float("-inf")))
    shift = shift.view(b, h, g, q, LSE_TERMS)
    ones = torch.ones(b * h, LSE_TERMS, p, dtype=torch.float32, device=key.device)
    keys_t = torch.cat([key.to(torch.float32).transpose(2, 3).reshape(b * h, d, p), ones], dim=1)  # contiguous
    queries = query.view(b, h, g, q, d)
    exact_bf16 = query.dtype == torch.bfloat16 and key.dtype == torch.bfloat16 and key.device.type == "cpu"
    unused = torch.empty(1, 1, 1, dtype=torch.float32, device=key.device)
    future = torch.ones(rows, rows, dtype=torch.bool, device=key.device).triu_(1)  # key after query, on the diagonal
    with exact_bf16_matmul(exact_bf16):
        for i0 in range(start, q, rows):
            i1 = min(q, i0 + rows)
            c, kmax = i1 - i0, min(p, col0 + i1)  # the block's last query sees slots [0, kmax)
            qc = torch.cat([queries[:, :, :, i0:i1].to(torch.float32), shift[:, :, :, i0:i1]], dim=-1)
            qc = qc.view(b * h, g * c, d + LSE_TERMS)
            kmin = 0 if sliding_window is None else max(0, col0 + i0 - sliding_window + 1)  # first query's first slot
            for j0 in range(kmin, kmax, tile):
                j1 = min(kmax, j0 + tile)
                # the scale is alpha, not part of the operands: they stay exact bfloat16 values (exact_bf16_matmul)
                logits = torch.baddbmm(unused, qc, keys_t[:, :, j0:j1], beta=0, alpha=scaling * _LOG2E)
                lo = max(j0, col0 + i0)  # slots from here on are after some query of the block
                if lo < j1:  # query i0 + r sees slot col0 + i0 + r: mask the columns past it
                    diag = future[:c, lo - col0 - i0 : j1 - col0 - i0]
                    logits.view(b * h, g, c, j1 - j0)[..., lo - j0 :].masked_fill_(diag, float("-inf"))
                if sliding_window is not None:
                    _mask_left_window(logits.view(b * h, g, c, j1 - j0), j0, col0 + i0 - sliding_window)
                total[:, j0:j1] += logits.exp2_().sum(dim=1)
                del logits
    # a padding key's logits were never masked (its column sum may be anything, even inf): it receives nothing
    return torch.where(valid, total.view(b, h, p), 0.0).div_(g)


def _mask_left_window(logits: torch.Tensor, j0: int, last_missed: int) -> None:
    """Mask, in a block ``[..., c, j1 - j0]`` of logits for slots ``j0 ...``, the slots row ``r`` cannot see because
    they left its window: those at or before ``last_missed + r``."""
    c, width = logits.shape[-2], logits.shape[-1]
    hi = min(width, last_missed + c - j0)  # past this column no row misses a slot
    if hi <= 0:
        return
    slots = torch.arange(j0, j0 + hi, device=logits.device)
    missed = slots[None, :] <= (last_missed + torch.arange(c, device=logits.device))[:, None]
    logits[..., :hi].masked_fill_(missed, float("-inf"))
