"""The attention kernels of the engine: grouped attention and the statistics a policy declares.

Pure tensor functions (no cache, no transformers): :func:`grouped_attention` attends per kv-head group under a
bool mask (keys are never repeated to query heads); :func:`attention_received` computes the attention each key
receives (:class:`~kvpolicy.core.policy.AttentionStat`) in query chunks, with a causal-prefix path for an uncompressed
layer; :func:`attention_with_received` and :func:`masked_attention_with_received` produce outputs and statistics from
one block of probabilities; :func:`probe_max_received` computes a probe's statistic
(:class:`~kvpolicy.core.policy.ProbeStat`). The registered attention function (:mod:`kvpolicy.core.attention`)
chooses among them; where SDPA's CPU flash kernel runs, a prefill takes the statistics from its log-sum-exp instead
(:mod:`kvpolicy.core.lse`) and these are the fallback.

Memory bound of the statistics: one chunk of float32 probabilities, ``B * Hq * rows * P * 4`` bytes with ``rows``
chosen so that this stays under :data:`STATS_CHUNK_ELEMENTS` elements (4 MiB: small chunks stay in cache and were
measured 3-7x faster than 64 MiB ones on CPU), plus a float32 copy of the layer's keys.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

__all__ = [
    "MAX_CHUNK_ELEMENTS",
    "MIN_CHUNK_ROWS",
    "STATS_CHUNK_ELEMENTS",
    "attention_received",
    "attention_with_received",
    "causal_prefix_blocks",
    "grouped_attention",
    "masked_attention_with_received",
    "probe_max_received",
]

#: upper bound on the float32 probability block materialised per chunk when computing statistics
STATS_CHUNK_ELEMENTS = 1 << 20
#: ... except that the causal-prefix paths take at least this many query rows per chunk: at long prompts the
#: element bound alone leaves a handful of rows per chunk (5 at 16384 tokens and 12 heads), and the matmuls of such
#: thin blocks were measured 20% slower per layer on CPU than 32-row ones (the block then grows to 24 MiB) ...
MIN_CHUNK_ROWS = 32
#: ... as long as the block stays under this many elements (32 MiB): a large batch or many heads at a long prompt
#: fall back to the element bound rather than growing the block without limit
MAX_CHUNK_ELEMENTS = 8 * STATS_CHUNK_ELEMENTS


def grouped_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float,
    eager: bool,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of ``query [B, Hq, q, D]`` over ``key/value [B, H, P, D]`` with a bool ``mask [B, H, q, P]``.

    Query heads of a group are folded into the query axis, so the cache is read once per kv head. Returns
    ``[B, q, Hq, D]`` like transformers' attention functions. ``bias``: float ``[B, H, P]`` added to every query's
    logit of each slot (:data:`~kvpolicy.core.policy.LOGIT_BIAS`); SDPA then takes it as a float mask of the query's
    dtype (in bfloat16 a bias of ``log 3`` is off by at most 2**-8 of itself)."""
    b, hq, q, d = query.shape
    h, p = key.shape[1], key.shape[2]
    g = hq // h
    qg = query.reshape(b, h, g * q, d)
    m = None
    if mask is not None:
        m = mask[:, :, None].expand(b, h, g, q, p).reshape(b, h, g * q, p)
    if bias is not None and not eager:
        add = bias[:, :, None, :].to(query.dtype).expand(b, h, g * q, p)
        m = add if m is None else add.masked_fill(~m, float("-inf"))
    if eager:
        w = torch.matmul(qg, key.transpose(2, 3)) * scaling
        if bias is not None:
            w = w + bias[:, :, None, :].to(w.dtype)
        if m is not None:
            w = w.masked_fill(~m, torch.finfo(w.dtype).min)
        w = torch.softmax(w, dim=-1, dtype=torch.float32).to(query.dtype)
        out = torch.matmul(w, value)
    else:
        out = torch.nn.functional.scaled_dot_product_attention(qg, key, value, attn_mask=m, scale=scaling)
    return out.reshape(b, hq, q, value.shape[-1]).transpose(1, 2).contiguous()


def attention_received(
    query: torch.Tensor,
    key: torch.Tensor,
    valid: torch.Tensor,
    key_pos: torch.Tensor,
    query_cols: torch.Tensor,
    query_valid: torch.Tensor,
    scaling: float,
    window: int | None,
    chunk_elements: int = STATS_CHUNK_ELEMENTS,
    first_slot_col: int | None = None,
    min_rows: int = MIN_CHUNK_ROWS,
    sliding_window: int | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention each key receives from the last ``window`` queries, averaged over each group's query heads.

    ``query [B, Hq, q, D]``, ``key [B, H, P, D]``, ``valid``/``key_pos [B, H, P]``, ``query_cols [q]`` logical columns
    of the queries (contiguous and increasing), ``query_valid`` bool ``[B, q]``. Returns float32 ``[B, H, P]``. Rows of
    queries are processed in chunks so that no more than ``chunk_elements`` probabilities exist at once.

    ``first_slot_col``: set when slot ``j`` holds column ``first_slot_col + j`` for every slot (an uncompressed layer,
    e.g. during prefill). Then a chunk of queries only multiplies against the keys at or before its last query
    (half the work of a whole prompt), the causal mask is a small block on the diagonal rather than a
    ``[B, H, g, rows, P]`` tensor, and the validity mask and the clean-up of all-masked rows are only applied when the
    batch really has padding.

    ``sliding_window``: the layer attends over that many columns (a sliding-window layer): a key more than
    ``sliding_window - 1`` columns before a query receives nothing from it, as in the layer's own attention.

    ``bias``: float ``[B, H, P]`` added to each slot's logit (the layer's :data:`~kvpolicy.core.policy.LOGIT_BIAS`,
    so the statistic is the probability the layer really attends with). Only a compressed layer carries one, so it
    never meets ``first_slot_col``."""
    if bias is not None and first_slot_col is not None:
        raise ValueError("a logit bias belongs to a compressed layer; first_slot_col describes an uncompressed one")
    b, hq, q, d = query.shape
    h, p = key.shape[1], key.shape[2]
    g = hq // h
    start = 0 if window is None else max(0, q - window)
    total = torch.zeros(b, h, p, dtype=torch.float32, device=key.device)
    if p == 0 or start >= q:
        return total
    k32 = key.to(torch.float32)
    if first_slot_col is not None:
        return _received_causal_prefix(
            query, k32, valid, query_cols, query_valid, scaling, start, chunk_elements, first_slot_col, total, min_rows,
            sliding_window,
        )
    rows = max(1, chunk_elements // max(1, b * hq * p))
    for i0 in range(start, q, rows):
        i1 = min(q, i0 + rows)
        c = i1 - i0
        qc = query[:, :, i0:i1].to(torch.float32).reshape(b, h, g * c, d)
        logits = torch.matmul(qc, k32.transpose(2, 3)).mul_(scaling).view(b, h, g, c, p)
        if bias is not None:
            logits.add_(bias[:, :, None, None, :].to(torch.float32))
        allowed = valid[:, :, None, None, :] & (key_pos[:, :, None, None, :] <= query_cols[i0:i1, None])
        if sliding_window is not None:
            allowed &= key_pos[:, :, None, None, :] > (query_cols[i0:i1] - sliding_window)[:, None]
        logits.masked_fill_(~allowed, float("-inf"))
        probs = torch.softmax(logits, dim=-1).nan_to_num_(0.0)  # a query that sees nothing contributes nothing
        probs.mul_(query_valid[:, None, None, i0:i1, None].to(probs.dtype))
        total += probs.sum(dim=(2, 3))
        del logits, probs, allowed
    return total.div_(g)


def causal_prefix_blocks(
    query: torch.Tensor,
    k32: torch.Tensor,
    valid: torch.Tensor,
    query_valid: torch.Tensor,
    scaling: float,
    start: int,
    col0: int,
    chunk_elements: int,
    min_rows: int,
    sliding_window: int | None = None,
) -> Iterator[tuple[int, int, int, torch.Tensor]]:
    """Softmax probabilities of the queries ``start..q`` in chunks, for slots in column order (slot ``j`` holds the
    column of query ``j - col0``): yields ``(i0, i1, kmax, probs [B, H, g, i1 - i0, kmax])``. A chunk meets only the
    keys at or before its last query; the causal mask is a block on the diagonal; padding masks and the clean-up of
    padding rows (zero) run only when there is padding. Shared by the statistics and the one-pass prefill.
    ``sliding_window``: query ``i`` also sees no slot at or before ``col0 + i - sliding_window`` (a band below the
    diagonal, masked only where the chunk reaches past the window)."""
    b, hq, q, d = query.shape
    h, p = k32.shape[1], k32.shape[2]
    g = hq // h
    padded = not bool(valid.all())
    padded_queries = not bool(query_valid[:, start:].all())
    i0 = start
    while i0 < q:
        # rows so that rows * (keys seen by the chunk's last query) stays within the budget
        per_row = max(1, b * hq * min(p, col0 + q))
        rows = min(q - i0, max(1, min(min_rows, MAX_CHUNK_ELEMENTS // per_row), chunk_elements // per_row))
        i1 = i0 + rows
        c = i1 - i0
        kmax = min(p, col0 + i1)  # the chunk's last query sees slots [0, kmax)
        lo = col0 + i0 + 1  # from here on, some query of the chunk is before the key
        qc = query[:, :, i0:i1].to(torch.float32).reshape(b, h, g * c, d)
        logits = torch.matmul(qc, k32[:, :, :kmax].transpose(2, 3)).mul_(scaling).view(b, h, g, c, kmax)
        if lo < kmax:
            future = torch.ones(c, kmax - lo, dtype=torch.bool, device=k32.device).triu_(0)
            logits[..., lo:kmax].masked_fill_(future, float("-inf"))
        past = 0 if sliding_window is None else min(kmax, col0 + i1 - sliding_window)  # slots some query cannot see
        if past > 0:
            rows_last = col0 + i0 - sliding_window + torch.arange(c, device=k32.device)  # last slot each row misses
            old = torch.arange(past, device=k32.device) <= rows_last[:, None]
            logits[..., :past].masked_fill_(old, float("-inf"))
        if padded:
            logits.masked_fill_(~valid[:, :, None, None, :kmax], float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        del logits
        if padded_queries:
            probs.nan_to_num_(0.0).mul_(query_valid[:, None, None, i0:i1, None].to(probs.dtype))
        yield i0, i1, kmax, probs
        i0 = i1


def _received_causal_prefix(
    query: torch.Tensor,
    k32: torch.Tensor,
    valid: torch.Tensor,
    query_cols: torch.Tensor,
    query_valid: torch.Tensor,
    scaling: float,
    start: int,
    chunk_elements: int,
    first_slot_col: int,
    total: torch.Tensor,
    min_rows: int,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """:func:`attention_received` for slots in column order (see there): keys after a chunk's last query are skipped."""
    g = query.shape[1] // k32.shape[1]
    col0 = int(query_cols[0]) - first_slot_col  # slot of the first query's own column
    for _, _, kmax, probs in causal_prefix_blocks(
        query, k32, valid, query_valid, scaling, start, col0, chunk_elements, min_rows, sliding_window
    ):
        total[:, :, :kmax] += probs.sum(dim=(2, 3))
    return total.div_(g)


def attention_with_received(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    valid: torch.Tensor,
    query_valid: torch.Tensor,
    scaling: float,
    first_slot_col: int,
    query_col0: int,
    chunk_elements: int = STATS_CHUNK_ELEMENTS,
    min_rows: int = MIN_CHUNK_ROWS,
    sliding_window: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Outputs and whole-prompt statistics of an uncompressed layer in one pass over the keys.

    The statistics need every query's softmax over its keys; the outputs are those same probabilities times the
    values. Computing both from one block of probabilities costs one attention pass plus a matmul, where SDPA for the
    outputs and :func:`attention_received` for the statistics cost two passes (measured on CPU at 4096 tokens:
    0.29 s vs 0.40 s per layer of 12 query heads). The outputs equal SDPA's up to float32 rounding, not bit for bit,
    so the caller only takes this path when the layer is about to be compressed anyway, and only where the exact route
    (SDPA's own outputs and log-sum-exp, :mod:`kvpolicy.core.lse`) is not available: eager attention, devices other
    than CPU, calls SDPA's CPU flash kernel does not take.

    ``query [B, Hq, q, D]``, ``key``/``value [B, H, P, D]`` with slot ``j`` holding column ``first_slot_col + j``,
    ``valid [B, H, P]``, ``query_valid [B, q]``, queries at columns ``query_col0 ...``. Returns outputs
    ``[B, q, Hq, Dv]`` (query dtype; rows of padding queries are zero) and float32 ``[B, H, P]`` statistics.
    ``sliding_window``: a sliding-window layer's window (see :func:`causal_prefix_blocks`)."""
    b, hq, q, d = query.shape
    h, p = key.shape[1], key.shape[2]
    g = hq // h
    dv = value.shape[-1]
    k32, v32 = key.to(torch.float32), value.to(torch.float32)
    total = torch.zeros(b, h, p, dtype=torch.float32, device=key.device)
    out = torch.empty(b, h, g, q, dv, dtype=torch.float32, device=query.device)
    for i0, i1, kmax, probs in causal_prefix_blocks(
        query, k32, valid, query_valid, scaling, 0, query_col0 - first_slot_col, chunk_elements, min_rows,
        sliding_window,
    ):
        total[:, :, :kmax] += probs.sum(dim=(2, 3))
        c = i1 - i0
        out[:, :, :, i0:i1] = torch.matmul(probs.view(b, h, g * c, kmax), v32[:, :, :kmax]).view(b, h, g, c, dv)
    out_t = out.view(b, hq, q, dv).transpose(1, 2).to(query.dtype).contiguous()
    return out_t, total.div_(g)


def masked_attention_with_received(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    query_valid: torch.Tensor | None,
    scaling: float,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Outputs of every query and the attention each key receives from all of them, from one probability block,
    under the engine's per-slot ``mask [B, H, q, P]`` (``None``: every slot visible); ``query_valid`` bool ``[B, q]``
    (``None``: every query is a real token); ``bias`` float ``[B, H, P]``: the layer's per-slot logit bias, if any.

    For the decode steps of a compressed layer whose policy needs this step's attention (H2O, TOVA): the step
    already attends under the engine's own mask, so computing outputs and statistics together saves one pass over
    the cache and an SDPA call per layer and step. Only for small ``q``: the block is ``[B, Hq, q, P]``. The two
    products are 3-D ``bmm`` calls over ``B * H`` (a used-slot view of the cache folds its batch and head axes
    without a copy): fewer operator calls than 4-D ``matmul``, which is what a decode step of a small budget costs."""
    b, hq, q, d = query.shape
    h, p = key.shape[1], key.shape[2]
    g = hq // h
    qg = _float32(query).reshape(b * h, g * q, d)
    k3 = _float32(key).reshape(b * h, p, d)
    logits = torch.bmm(qg, k3.transpose(1, 2)).mul_(scaling)
    if bias is not None:  # the layer's per-slot logit bias (LOGIT_BIAS), the same for every query of the group
        logits.add_(bias.to(torch.float32).reshape(b * h, 1, p))
    if mask is not None:
        m = mask[:, :, None].expand(b, h, g, q, p).reshape(b * h, g * q, p)
        logits.masked_fill_(~m, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if mask is not None:
        probs.nan_to_num_(0.0)  # a query that sees nothing (padding) attends to nothing
    out = torch.bmm(probs if probs.dtype == value.dtype else probs.to(value.dtype), value.reshape(b * h, p, -1))
    # [B, Hq, q, Dv] -> [B, q, Hq, Dv]: for one query the same memory, so a view (no transpose, no copy)
    out = out.view(b, q, hq, -1) if q == 1 else out.view(b, hq, q, -1).transpose(1, 2).contiguous()
    pv = probs.view(b, h, g, q, p)
    if query_valid is not None and not bool(query_valid.all()):
        pv = pv * query_valid[:, None, None, :, None].to(pv.dtype)
    return out, pv.sum(dim=(2, 3)).div_(g)


def probe_max_received(
    query: torch.Tensor,
    context_keys: torch.Tensor,
    context_ok: torch.Tensor,
    probe_keys: torch.Tensor,
    probe_valid: torch.Tensor,
    scaling: float,
    chunk_elements: int = STATS_CHUNK_ELEMENTS,
    min_rows: int = MIN_CHUNK_ROWS,
) -> torch.Tensor:
    """The largest attention each selected context key receives from a probe's queries (:class:`~kvpolicy.core.policy.ProbeStat`).

    ``query [B, Hq, q, D]`` are the probe's queries and ``probe_keys [B, H, q, D]`` its own keys (slot ``i`` = query
    ``i``; ``probe_valid`` bool ``[B, q]`` marks its real tokens, left padding False); ``context_keys [B, H, K, D]``
    the context entries the probe's softmax covers (``context_ok`` bool ``[B, K]``: a real selected entry). Each real
    query's softmax runs over the selected context keys and the probe's real keys up to itself; returns float32
    ``[B, H, K]``: the maximum over the real queries and over the query heads of each kv group (0 where nothing
    attends). Query rows are taken in blocks so that at most ``chunk_elements`` probabilities exist at once (at least
    ``min_rows`` rows while that stays under :data:`MAX_CHUNK_ELEMENTS`), as :func:`attention_received` does."""
    b, hq, q, d = query.shape
    h, k = context_keys.shape[1], context_keys.shape[2]
    g = hq // h
    keys = torch.cat((context_keys, probe_keys), dim=2).to(torch.float32)  # [B, H, K + q, D]
    scaled = query.to(torch.float32) * scaling  # scaling the queries once costs less than scaling every logit
    best = torch.zeros(b, h, k, dtype=torch.float32, device=query.device)
    # masks only where they change something: selections of unequal length, left-padded probes
    ctx_off = None if bool(context_ok.all()) else ~context_ok[:, None, None, None, :]
    probe_off = None if bool(probe_valid.all()) else ~probe_valid[:, None, None, None, :]
    per_row = max(1, b * hq * (k + q))
    rows = max(1, min(max(min_rows, 1), MAX_CHUNK_ELEMENTS // per_row), chunk_elements // per_row)
    for i0 in range(0, q, rows):
        i1 = min(q, i0 + rows)
        c = i1 - i0
        qc = scaled[:, :, i0:i1].reshape(b, h, g * c, d)
        logits = torch.matmul(qc, keys[:, :, : k + i1].transpose(2, 3)).view(b, h, g, c, k + i1)
        if ctx_off is not None:
            logits[..., :k].masked_fill_(ctx_off, float("-inf"))
        if probe_off is not None:
            logits[..., k:].masked_fill_(probe_off[..., :i1], float("-inf"))
        future = torch.ones(c, c, dtype=torch.bool, device=query.device).triu_(1)  # the block's own later tokens
        logits[..., k + i0 :].masked_fill_(future, float("-inf"))
        probs = torch.softmax(logits, dim=-1)[..., :k]
        if probe_off is not None:  # pad queries attend to nothing
            probs = probs.nan_to_num(0.0).mul_(probe_valid[:, None, None, i0:i1, None].to(probs.dtype))
        best = torch.maximum(best, probs.amax(dim=(2, 3)))
        del logits, probs
    return best


def _float32(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32 (itself when it already is: even a no-op ``.to`` is an operator call)."""
    return t if t.dtype == torch.float32 else t.to(torch.float32)
