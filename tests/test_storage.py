"""The two storage layouts behind one interface: a bucketed layer holds, reports and attends exactly like the padded
layer it was built from, through every operation of the SlotStorage interface."""

from __future__ import annotations

import pytest
import torch

from kvpolicy.core.buckets import BucketedStorage, bucketed_if_uneven
from kvpolicy.core.kernels import grouped_attention
from kvpolicy.core.policy import GENERATED, TEXT, Reduction
from kvpolicy.core.storage import PaddedStorage

B, H, G, D, N = 2, 4, 2, 8, 24
#: kept entries per (row, head): uneven across heads, so that padding every head to the longest wastes bytes
KEEP = [[3, 20, 7, 12], [5, 18, 2, 12]]


def _reduced_padded(seed: int = 0) -> PaddedStorage:
    """A padded layer after a prefill reduction keeping ``KEEP[b][h]`` random entries of ``N`` columns."""
    gen = torch.Generator().manual_seed(seed)
    k, v = torch.randn(B, H, N, D, generator=gen), torch.randn(B, H, N, D, generator=gen)
    storage = PaddedStorage(k, v)
    storage.append(k, v, torch.arange(N), torch.full((1, 1, N), TEXT, dtype=torch.int8), slack=0)
    width = max(max(row) for row in KEEP)
    index = torch.zeros(B, H, width, dtype=torch.long)
    ok = torch.zeros(B, H, width, dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            n = KEEP[b][h]
            index[b, h, :n] = torch.randperm(N, generator=gen)[:n].sort().values
            ok[b, h, :n] = True
    storage.compact(Reduction(index=index, valid=ok))
    return storage


def _reference_attention(padded: PaddedStorage, query: torch.Tensor, seen: int) -> torch.Tensor:
    """Per query head, plain softmax attention over that head's valid entries at or before the query's column."""
    q = query.shape[2]
    out = torch.zeros(B, q, H * G, D)
    for b in range(B):
        for hq in range(H * G):
            valid, pos, _ = padded.slots(hq // G)
            k, v = padded.head_kv(hq // G)
            for i in range(q):
                see = valid[b] & (pos[b] <= seen - q + i)
                w = torch.softmax(k[b][see] @ query[b, hq, i] * D**-0.5, dim=-1)
                out[b, i, hq] = w @ v[b][see]
    return out


def _same_heads(a, b) -> None:
    """Both layouts hold the same entries per (row, head): positions, types, keys and values, as sets by position."""
    assert torch.equal(a.held(), b.held())
    for h in range(H):
        (va, pa, ta), (vb, pb, tb) = a.slots(h), b.slots(h)
        (ka, xa), (kb, xb) = a.head_kv(h), b.head_kv(h)
        for r in range(B):
            ia, ib = pa[r][va[r]].argsort(), pb[r][vb[r]].argsort()
            assert torch.equal(pa[r][va[r]][ia], pb[r][vb[r]][ib])
            assert torch.equal(ta[r][va[r]][ia], tb[r][vb[r]][ib])
            assert torch.equal(ka[r][va[r]][ia], kb[r][vb[r]][ib])
            assert torch.equal(xa[r][va[r]][ia], xb[r][vb[r]][ib])


def test_uneven_heads_are_bucketed_and_hold_what_the_padded_layer_held():
    padded = _reduced_padded()
    bucketed = bucketed_if_uneven(_reduced_padded())
    assert isinstance(bucketed, BucketedStorage) and not bucketed.pristine
    _same_heads(padded, bucketed)
    # fewer key/value bytes than every head padded to the longest, and never fewer than the entries held
    entry = B * (D + D) * 4
    assert bucketed.nbytes() < padded.nbytes() == H * 20 * entry
    assert bucketed.nbytes() >= sum(max(KEEP[b][h] for b in range(B)) for h in range(H)) * entry
    assert bucketed.slot_nbytes() == padded.slot_nbytes() == B * H * 2 * D * 4


def test_even_heads_keep_the_padded_layout():
    storage = PaddedStorage(torch.zeros(1, 2, 0, D), torch.zeros(1, 2, 0, D))
    k = torch.randn(1, 2, 6, D)
    storage.append(k, k, torch.arange(6), torch.zeros(1, 1, 6, dtype=torch.int8), slack=0)
    assert bucketed_if_uneven(storage) is storage


@pytest.mark.parametrize("q", [1, 3])
def test_both_layouts_append_mark_padding_select_rows_and_attend_alike(q):
    padded, bucketed = _reduced_padded(1), bucketed_if_uneven(_reduced_padded(1))
    seen = N
    gen = torch.Generator().manual_seed(5)
    for step in range(3):
        k, v = torch.randn(B, H, q, D, generator=gen), torch.randn(B, H, q, D, generator=gen)
        cols = torch.arange(seen, seen + q)
        seen += q
        types = torch.full_like(cols, GENERATED, dtype=torch.int8)
        for storage in (padded, bucketed):
            storage.append(k, v, cols, types, slack=1)
        if step == 1:  # the last new token of row 0 is padding
            new_valid = torch.ones(B, q, dtype=torch.bool)
            new_valid[0, -1] = False
            for storage in (padded, bucketed):
                storage.invalidate_new(new_valid)
        _same_heads(padded, bucketed)
        query = torch.randn(B, H * G, q, D, generator=gen)
        want = _reference_attention(padded, query, seen)
        for storage in (padded, bucketed):
            torch.testing.assert_close(storage.attend(query, seen, D**-0.5, eager=True), want, atol=1e-5, rtol=1e-5)
    index = torch.tensor([1, 1, 0])
    for storage in (padded, bucketed):
        storage.select_rows(index)
    assert padded.held().shape == (3, H)
    _same_heads(padded, bucketed)


def test_padded_attend_is_grouped_attention_under_the_slot_mask():
    padded = _reduced_padded(2)
    query = torch.randn(B, H * G, 2, D)
    mask = padded.valid[:, :, None, :] & (padded.positions[:, :, None, :] <= torch.tensor([N - 2, N - 1])[:, None])
    want = grouped_attention(query, padded.keys, padded.values, mask, D**-0.5, eager=False)
    assert torch.equal(padded.attend(query, N, D**-0.5, eager=False), want)
