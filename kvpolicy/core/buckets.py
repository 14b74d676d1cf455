"""Per-head budgets that really save memory: kv heads stored in buckets of similar length.

When a reducer keeps a different number of entries per kv head (AdaKV-style allocation), one ``[B, H, P, D]``
tensor padded to the longest head would hold as many bytes as the longest head times ``H`` — a head-wise policy that
saves nothing. Instead the layer's heads are sorted by how many entries they keep and split into a few contiguous
buckets, each stored as its own ``[B, H_b, P_b, D]`` tensor; attention runs per bucket (the query heads of a bucket's
kv heads attend to that bucket only), so padding is bounded by the spread inside a bucket. The partition is the
fewest buckets whose padded size is within :data:`SLACK` of the unpadded size (an exact dynamic programme over the
sorted heads; ``H`` is small).

Scope: :class:`BucketedStorage` is the layout of a layer whose policy has no stage left to run after prefill
(``decode=None``, no per-slot state) — AdaKV, SnapKV-style presets. :func:`bucketed_if_uneven` chooses it once, right
after the prefill reduction; decode tokens are then appended to every bucket. A policy with a decode scorer keeps the
padded layout (:class:`~kvpolicy.core.storage.PaddedStorage`), where the engine's per-step drop logic acts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .kernels import grouped_attention
from .masks import slot_mask
from .storage import PaddedStorage, SlotStorage, growth

__all__ = ["MAX_BUCKETS", "SLACK", "Bucket", "BucketedStorage", "bucketed_if_uneven", "partition", "split"]

#: accepted padding overhead of the bucketed layout over the entries actually kept
SLACK = 0.03
MAX_BUCKETS = 8


def partition(counts: list[int], slack: float = SLACK, max_buckets: int = MAX_BUCKETS) -> list[list[int]]:
    """Split heads (given their entry counts) into contiguous groups of the count-sorted order.

    Returns lists of head indices. Uses the fewest groups whose padded total ``sum(len(g) * max(g))`` is within
    ``slack`` of ``sum(counts)``, or the best partition with ``max_buckets`` groups."""
    order = sorted(range(len(counts)), key=lambda h: counts[h])
    c = [counts[h] for h in order]
    n = len(c)
    ideal = sum(c)
    inf = float("inf")
    # best[k][i]: minimal padded size of the first i sorted heads in k groups; cut[k][i]: start of the last group
    best = [[inf] * (n + 1) for _ in range(max_buckets + 1)]
    cut = [[0] * (n + 1) for _ in range(max_buckets + 1)]
    best[0][0] = 0
    chosen = None
    for k in range(1, min(max_buckets, n) + 1):
        for i in range(1, n + 1):
            for j in range(k - 1, i):
                cost = best[k - 1][j] + (i - j) * c[i - 1]
                if cost < best[k][i]:
                    best[k][i], cut[k][i] = cost, j
        if best[k][n] <= ideal * (1 + slack):
            chosen = k
            break
    if chosen is None:
        chosen = min(max_buckets, n)
    groups, i = [], n
    for k in range(chosen, 0, -1):
        j = cut[k][i]
        groups.append([order[x] for x in range(j, i)])
        i = j
    return groups[::-1]


@dataclass
class Bucket:
    """The kv heads ``heads`` of one layer, with their own slots."""

    heads: torch.Tensor  # int64 [H_b]
    k: torch.Tensor  # [B, H_b, C, D]
    v: torch.Tensor
    valid: torch.Tensor  # bool [B, H_b, C]
    pos: torch.Tensor  # int64 [B, H_b, C]
    types: torch.Tensor  # int8 [B, H_b, C]
    length: int

    def append(self, k: torch.Tensor, v: torch.Tensor, cols: torch.Tensor, types: torch.Tensor) -> None:
        """Append this step's tokens (``k``/``v`` of all heads) at the end, growing by 1/32 when full."""
        q = k.shape[2]
        if self.length + q > self.k.shape[2]:
            cap = self.length + q + growth(self.length)

            def grow(t: torch.Tensor) -> torch.Tensor:
                new = t.new_zeros((*t.shape[:2], cap, *t.shape[3:]))
                new[:, :, : self.length] = t[:, :, : self.length]
                return new

            self.k, self.v, self.valid, self.pos, self.types = map(
                grow, (self.k, self.v, self.valid, self.pos, self.types)
            )
        end = self.length + q
        self.k[:, :, self.length : end] = k.index_select(1, self.heads)
        self.v[:, :, self.length : end] = v.index_select(1, self.heads)
        self.valid[:, :, self.length : end] = True
        self.pos[:, :, self.length : end] = cols
        self.types[:, :, self.length : end] = types
        self.length = end

    def select_rows(self, index: torch.Tensor) -> None:
        self.k, self.v, self.valid, self.pos, self.types = (
            t[index] for t in (self.k, self.v, self.valid, self.pos, self.types)
        )

    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def meta_nbytes(self) -> int:
        return self.valid.nbytes + self.pos.nbytes + self.types.nbytes


def split(
    keys: torch.Tensor,
    values: torch.Tensor,
    valid: torch.Tensor,
    pos: torch.Tensor,
    types: torch.Tensor,
) -> list[Bucket]:
    """Buckets from a padded layer (``[B, H, P, ...]``), each trimmed to its own longest row."""
    held = valid.sum(-1)  # [B, H]
    groups = partition(held.amax(0).tolist())
    # valid entries first inside every row, so that trimming to the longest row drops only padding
    order = (~valid).to(torch.int8).argsort(dim=-1, stable=True)
    out = []
    for heads in groups:
        h = torch.tensor(heads, dtype=torch.long, device=keys.device)
        length = int(held[:, h].max()) if held.numel() else 0
        idx = order[:, h, :length]
        d_idx = idx[..., None]
        out.append(
            Bucket(
                heads=h,
                k=keys[:, h].gather(2, d_idx.expand(*idx.shape, keys.shape[-1])).contiguous(),
                v=values[:, h].gather(2, d_idx.expand(*idx.shape, values.shape[-1])).contiguous(),
                valid=valid[:, h].gather(2, idx),
                pos=pos[:, h].gather(2, idx),
                types=types[:, h].gather(2, idx),
                length=length,
            )
        )
    return out


class BucketedStorage(SlotStorage):
    """A layer's kv heads in :class:`Bucket` s (see the module docstring): built once from a padded layout."""

    def __init__(self, buckets: list[Bucket], num_heads: int):
        self.buckets = buckets
        self.num_heads = num_heads
        self.pristine = False  # only ever built from a reduced layout

    def _find(self, head: int) -> tuple[Bucket, int]:
        for b in self.buckets:
            hits = (b.heads == head).nonzero()
            if hits.numel():
                return b, int(hits[0, 0])
        raise IndexError(head)

    @property
    def length(self) -> int:
        return max(b.length for b in self.buckets)

    @property
    def keys(self) -> torch.Tensor:  # transformers only needs a tensor here; attention reads the buckets
        first = self.buckets[0]
        return first.k[:, :, : first.length]

    @property
    def values(self) -> torch.Tensor:
        first = self.buckets[0]
        return first.v[:, :, : first.length]

    @property
    def capacity(self) -> int:
        return max(b.k.shape[2] for b in self.buckets)

    def append(self, k: torch.Tensor, v: torch.Tensor, cols: torch.Tensor, types: torch.Tensor, slack: int) -> None:
        """At the end of every bucket (each grows by its own 1/32 when full; ``slack`` is not used)."""
        for bucket in self.buckets:
            bucket.append(k, v, cols, types)

    def invalidate_new(self, new_valid: torch.Tensor) -> None:
        q = new_valid.shape[-1]
        for bucket in self.buckets:
            bucket.valid[:, :, bucket.length - q : bucket.length] &= new_valid[:, None, :]

    def select_rows(self, index: torch.Tensor) -> None:
        for bucket in self.buckets:
            bucket.select_rows(index)

    def held(self) -> torch.Tensor:
        first = self.buckets[0].valid
        out = torch.zeros(first.shape[0], self.num_heads, dtype=torch.long, device=first.device)
        for b in self.buckets:
            out[:, b.heads] = b.valid[:, :, : b.length].sum(-1)
        return out

    def slots(self, head: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, i = self._find(head)
        return b.valid[:, i, : b.length], b.pos[:, i, : b.length], b.types[:, i, : b.length]

    def head_kv(self, head: int) -> tuple[torch.Tensor, torch.Tensor]:
        b, i = self._find(head)
        return b.k[:, i, : b.length], b.v[:, i, : b.length]

    def attend(self, query: torch.Tensor, seen: int, scaling: float, eager: bool) -> torch.Tensor:
        """Each bucket's query heads attend to that bucket only."""
        b, hq, q, d = query.shape
        g = hq // self.num_heads
        out = query.new_empty(b, q, hq, self.buckets[0].v.shape[-1])
        for bucket in self.buckets:
            n = bucket.length
            qh = (bucket.heads[:, None] * g + torch.arange(g, device=query.device)).reshape(-1)
            mask = slot_mask(bucket.valid[:, :, :n], bucket.pos[:, :, :n], q, seen)
            out[:, :, qh] = grouped_attention(
                query.index_select(1, qh), bucket.k[:, :, :n], bucket.v[:, :, :n], mask, scaling, eager
            )
        return out

    def nbytes(self) -> int:
        return sum(b.nbytes() for b in self.buckets)

    def slot_nbytes(self) -> int:
        """Bytes of one slot across rows and all kv heads, as in the padded layout (buckets differ in length, so
        ``nbytes()`` is not ``capacity * slot_nbytes()`` here)."""
        k, v = self.buckets[0].k, self.buckets[0].v
        return k.shape[0] * self.num_heads * (k.shape[-1] * k.element_size() + v.shape[-1] * v.element_size())

    def meta_nbytes(self) -> int:
        return sum(b.meta_nbytes() for b in self.buckets)


def bucketed_if_uneven(storage: PaddedStorage) -> SlotStorage:
    """The layout a layer keeps after its prefill reduction: buckets when the heads' kept counts differ enough that
    padding them to the longest would waste more than :data:`SLACK` of the bytes, else ``storage`` unchanged."""
    held = storage.held().amax(0)  # longest row per head
    padded = held.numel() * int(held.max()) if held.numel() else 0
    if padded <= (1 + SLACK) * int(held.sum()):
        return storage
    return BucketedStorage(
        split(storage.keys, storage.values, storage.valid, storage.positions, storage.token_types),
        num_heads=storage.valid.shape[1],
    )
