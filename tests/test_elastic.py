"""Elastic Cache parts (plugins/elastic.py) against naive references, the authors' code, and a tiny LLaVA end to end.

Naive references loop over positions in Python, one row (and head) at a time; the authors' prefill compression is
copied line by line from liuzuyan/ElasticCache@3138e03 ``kv_cache.py`` (``.cuda()`` removed) for batch 1.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from kvpolicy_plugins import elastic
from kvpolicy_plugins.elastic import AnchorMerge, DistanceOffset, FrequencyScorer

import kvpolicy
from kvpolicy import AttentionStat, Budget, CachePolicy, LayerView, testing

# ============================================================================================== unit-test views


def make_view(**kw) -> LayerView:
    """:func:`kvpolicy.testing.make_view` with this file's defaults: 24 slots, pads (0, 3, 7), text entries only, no
    attention statistic, layer 0 of 1."""
    defaults = {"P": 24, "pads": (0, 3, 7), "windows": (), "token_types": "text", "layer_idx": 0, "num_layers": 1}
    return testing.make_view(**{**defaults, **kw})


def row_slots(view: LayerView, b: int, h: int) -> list[int]:
    """Valid slots of one row and head, oldest first."""
    slots = [j for j in range(view.num_slots) if bool(view.valid[b, h, j])]
    return sorted(slots, key=lambda j: int(view.positions[b, h, j]))


def reduction_rows(view: LayerView, red: kvpolicy.Reduction) -> dict:
    """``(b, h) -> [(position, key, value), ...]`` of the entries a Reduction keeps, oldest first."""
    out = {}
    for b in range(view.batch_size):
        for h in range(view.num_heads):
            rows = [(int(view.positions[b, h, slot]), k, v) for slot, k, v in testing.kept_entries(view, red, b, h)]
            out[b, h] = sorted(rows, key=lambda r: r[0])
    return out


def assert_same_rows(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for bh, rows in expected.items():
        assert [r[0] for r in got[bh]] == [r[0] for r in rows], f"kept positions differ at {bh}"
        for (pos, k, v), (_, ek, ev) in zip(got[bh], rows):
            torch.testing.assert_close(k, ek.to(k.dtype), atol=1e-6, rtol=1e-6, msg=f"key at {bh} pos {pos}")
            torch.testing.assert_close(v, ev.to(v.dtype), atol=1e-6, rtol=1e-6, msg=f"value at {bh} pos {pos}")


# ============================================================================================== frequency


def naive_frequency(query, key, valid, per_head, normalize):
    """score[b, j] = sum over real queries i >= j of the mean over heads of softmax attention (loops)."""
    b_, hq, p, d = query.shape
    h = key.shape[1]
    g = hq // h
    out = torch.zeros(b_, h, p, dtype=torch.float64)
    for b in range(b_):
        real = [j for j in range(p) if valid[b, j]]
        for head in range(hq):
            kv = head // g
            for i in real:
                cols = [j for j in real if j <= i]
                logits = torch.stack([query[b, head, i] @ key[b, kv, j] for j in cols]).double() * d**-0.5
                for j, a in zip(cols, torch.softmax(logits, 0)):
                    out[b, kv, j] += a / g
        if normalize:
            for j in real:
                out[b, :, j] /= sum(1 for i in real if i >= j)
    if not per_head:
        out = out.mean(1, keepdim=True)
    return out.float()


@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("normalize", [False, True])
def test_frequency_matches_naive(per_head, normalize):
    from kvpolicy.core.kernels import attention_received

    torch.manual_seed(0)
    b, hq, h, p, d = 3, 4, 2, 13, 8  # GQA: 4 query heads on 2 kv heads
    pads = [0, 2, 5]
    query, key = torch.randn(b, hq, p, d), torch.randn(b, h, p, d)
    valid = torch.ones(b, p, dtype=torch.bool)
    for r, n in enumerate(pads):
        valid[r, :n] = False
    view = make_view(B=b, H=h, P=p, D=d, pads=tuple(pads))
    view.keys = key
    att = attention_received(query, key, view.valid, view.positions, torch.arange(p), valid, d**-0.5, None)
    view.attention = {None: att}
    scorer = FrequencyScorer(per_head=per_head, normalize=normalize)
    assert scorer.needs == frozenset({AttentionStat(window=None)})
    got = scorer.score(view)
    assert got.shape == (b, h if per_head else 1, p)
    expected = naive_frequency(query, key, valid, per_head, normalize)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    assert ("per_head_scores" in scorer.provides) == per_head


def test_frequency_needs_prompt_attention():
    with pytest.raises(KeyError, match="AttentionStat"):
        FrequencyScorer().score(make_view())


# ============================================================================================== anchor_merge


def naive_anchor_merge(
    view: LayerView,
    scores: torch.Tensor,
    keep: list[int],
    start_size: int = 1,
    keep_last: bool = True,
    assign: str = "position",
    weighting: str = "mean",
    merge: str = "kv",
    rank_by_index: bool = False,
    off_by_one: bool = False,
    shifted: bool = False,
    keep_per_head: list[list[int]] | None = None,
    min_similarity: float | None = None,
) -> dict:
    """The paper's rule (and each quirk), one row and head at a time, with Python loops and float64 sums;
    ``keep_per_head[b][h]``, when given, replaces ``keep[b]`` (budgets shared across heads)."""
    out = {}
    for b in range(view.batch_size):
        for h in range(view.num_heads):
            hs = h if scores.shape[1] > 1 else 0
            slots = row_slots(view, b, h)
            t, k = len(slots), keep[b] if keep_per_head is None else keep_per_head[b][h]

            def pos(j, b=b, h=h):
                return int(view.positions[b, h, j])

            def score(j, b=b, hs=hs):
                return float(scores[b, hs, j])

            if k >= t:
                out[b, h] = [(pos(j), view.keys[b, h, j], view.values[b, h, j]) for j in slots]
                continue
            n_last = 1 if keep_last and k >= 1 else 0
            n_sink = min(start_size, k - n_last)
            sinks, last = slots[:n_sink], slots[t - n_last :]
            cands = slots[n_sink : t - n_last]
            n_anchor = min(len(cands), max(0, k - n_sink - n_last - (1 if off_by_one else 0)))
            if rank_by_index:
                perm = sorted(range(len(cands)), key=lambda i: (score(cands[i]), i))  # argsort, ascending
                threshold = len(cands) - 1 - n_anchor
                anchors = [cands[r] for r in range(len(cands)) if perm[r] > threshold]
            else:
                best = sorted(range(len(cands)), key=lambda i: (-score(cands[i]), i))[:n_anchor]
                anchors = [cands[i] for i in sorted(best)]
            dropped_ordinals = [i for i, c in enumerate(cands) if c not in anchors]
            if shifted:  # candidate ordinal used as a row ordinal: no "+ start"
                sources = [slots[i] for i in dropped_ordinals]
            else:
                sources = [cands[i] for i in dropped_ordinals]
            groups = {a: [] for a in anchors}
            for src in sources:
                if not anchors:
                    continue
                best_a, best_d = None, None
                for a in anchors:  # oldest first: strict comparison sends ties to the older anchor
                    if assign == "position":
                        dist = abs(pos(a) - pos(src))
                        better = best_d is None or dist < best_d
                    else:
                        ka, ks = view.keys[b, h, a].double(), view.keys[b, h, src].double()
                        dist = float(ka @ ks / (ka.norm().clamp(min=1e-12) * ks.norm().clamp(min=1e-12)))
                        better = best_d is None or dist > best_d
                    if better:
                        best_a, best_d = a, dist
                if min_similarity is not None:  # gate: too dissimilar to its anchor -> evicted, not merged
                    ka, ks = view.keys[b, h, best_a].double(), view.keys[b, h, src].double()
                    cos = float(ka @ ks / (ka.norm().clamp(min=1e-12) * ks.norm().clamp(min=1e-12)))
                    if cos < min_similarity:
                        continue
                groups[best_a].append(src)
            merged = {}
            for a, members in groups.items():
                if not members:
                    continue
                group = [a] + members
                w = [max(score(j), 0.0) if weighting == "score" else 1.0 for j in group]
                if sum(w) <= 0:
                    w = [1.0] * len(group)
                mk = sum(wi * view.keys[b, h, j].double() for wi, j in zip(w, group)) / sum(w)
                mv = sum(wi * view.values[b, h, j].double() for wi, j in zip(w, group)) / sum(w)
                merged[a] = (view.keys[b, h, a] if merge == "values" else mk, mv)
            kept = sorted(sinks + anchors + last, key=pos)
            out[b, h] = [
                (pos(j), *merged.get(j, (view.keys[b, h, j], view.values[b, h, j]))) for j in kept
            ]
    return out


def budget_keep(view: LayerView, ratio: float) -> list[int]:
    return [math.ceil(int(n) * (1 - ratio)) for n in view.n_tokens]


OPTION_CASES = [
    {},
    {"start_size": 0},
    {"start_size": 4},
    {"keep_last": False},
    {"assign": "cosine"},
    {"weighting": "score"},
    {"merge": "values"},
    {"assign": "cosine", "weighting": "score", "merge": "values", "start_size": 2},
    {"min_similarity": 0.0},
    {"assign": "cosine", "min_similarity": 0.2, "merge": "values"},
    {"min_similarity": -1.0},
]


@pytest.mark.parametrize("options", OPTION_CASES, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "paper")
@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("ratio", [0.2, 0.5, 0.8])
def test_anchor_merge_matches_naive(options, per_head, shuffle, ratio):
    view = make_view(shuffle=shuffle, seed=3)
    g = torch.Generator().manual_seed(11)
    scores = torch.rand(view.batch_size, view.num_heads if per_head else 1, view.num_slots, generator=g)
    keep = budget_keep(view, ratio)
    red = AnchorMerge(**options).reduce(view, scores, torch.tensor(keep))
    expected = naive_anchor_merge(view, scores, keep, **options)
    assert_same_rows(reduction_rows(view, red), expected)
    for b in range(view.batch_size):  # exactly `keep` entries per row and head
        assert red.valid[b].sum(-1).tolist() == [min(keep[b], int(view.n_tokens[b]))] * view.num_heads


def naive_shared_counts(view: LayerView, scores: torch.Tensor, keep: list[int], floor_share: float) -> list[list[int]]:
    """AdaKV's allocation with loops: each head its floor(share * keep) best entries (ties: older), then the best
    remaining entries of any head (ties: lower head, then the head's own order) until the row holds H * keep."""
    out = []
    for b in range(view.batch_size):
        ranked = []
        for h in range(view.num_heads):
            slots = row_slots(view, b, h)  # oldest first, so a stable sort sends ties to the older entry
            ranked.append(sorted(slots, key=lambda j, b=b, h=h: -float(scores[b, h, j])))
        k = min(keep[b], min(len(r) for r in ranked))
        floor = math.floor(floor_share * keep[b])
        counts = [min(floor, len(r)) for r in ranked]
        rest = sorted(
            (-float(scores[b, h, j]), h, rank) for h, r in enumerate(ranked) for rank, j in enumerate(r) if rank >= floor
        )
        for _, h, _ in rest[: view.num_heads * k - sum(counts)]:
            counts[h] += 1
        out.append(counts)
    return out


@pytest.mark.parametrize("options", [{}, {"start_size": 4}, {"assign": "cosine", "merge": "values"},
                                     {"weighting": "score", "keep_last": False}],
                         ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "paper")
@pytest.mark.parametrize("floor_share", [0.0, 0.2, 1.0])
@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("ratio", [0.5, 0.8])
def test_anchor_merge_shared_heads_matches_naive(options, floor_share, shuffle, ratio):
    """heads: shared = AdaKV's per-head counts (a loop reference), then the paper's rule in each head with its own
    count: skewed scores so that the heads' counts differ, 4 kv heads, left-padded rows, shuffled slots."""
    view = make_view(shuffle=shuffle, seed=7, H=4)
    g = torch.Generator().manual_seed(13)
    scores = torch.rand(view.batch_size, view.num_heads, view.num_slots, generator=g) ** 4
    scores[:, 1] *= 3.0  # one head's entries outrank the others': it takes more of the shared budget
    keep = budget_keep(view, ratio)
    counts = naive_shared_counts(view, scores, keep, floor_share)
    # a floor of the whole uniform budget leaves nothing to share; below it the heads' counts must differ
    assert any(len(set(c)) > 1 for c in counts) == (floor_share < 1), counts
    red = AnchorMerge(heads="shared", head_floor=floor_share, **options).reduce(view, scores, torch.tensor(keep))
    expected = naive_anchor_merge(view, scores, keep, keep_per_head=counts, **options)
    assert_same_rows(reduction_rows(view, red), expected)
    for b in range(view.batch_size):  # the row spends exactly its budget, however the heads split it
        assert int(red.valid[b].sum()) == view.num_heads * min(keep[b], int(view.n_tokens[b]))


def test_anchor_merge_shared_heads_counts_are_adakvs():
    """The counts a shared anchor_merge spends are the entries the adakv reducer keeps per head."""
    from kvpolicy_plugins.adakv import AdaKVReducer

    view = make_view(seed=2, H=4)
    scores = torch.rand(view.batch_size, view.num_heads, view.num_slots, generator=torch.Generator().manual_seed(1))
    keep = torch.tensor(budget_keep(view, 0.7))
    merged = AnchorMerge(heads="shared", head_floor=0.2, keep_last=False, start_size=0).reduce(view, scores, keep)
    evicted = AdaKVReducer(alpha=0.2).reduce(view, scores, keep)
    assert merged.valid.sum(-1).tolist() == evicted.valid.sum(-1).tolist()


def test_anchor_merge_shared_heads_needs_per_head_scores():
    """Refused when the policy is composed (a scorer that gives no kv-head axis), and at run time on head-averaged
    scores, naming the part and the option."""
    from kvpolicy.config import PolicyConfigError, load_policy

    with pytest.raises(PolicyConfigError, match="per_head_scores"):
        load_policy({"encode": {"name": "local"}, "reducer": {"name": "anchor_merge", "heads": "shared"},
                     "ratio": 0.5})
    load_policy({"encode": {"name": "local"}, "reducer": {"name": "anchor_merge"}, "ratio": 0.5})  # uniform: fine
    view = make_view(seed=1)
    with pytest.raises(ValueError, match="anchor_merge with heads: shared needs scores per kv head"):
        AnchorMerge(heads="shared").reduce(view, torch.rand(view.batch_size, 1, view.num_slots),
                                           torch.tensor(budget_keep(view, 0.5)))


@pytest.mark.parametrize("weighting", ["mean", "score"])
def test_anchor_merge_ties_and_zero_scores(weighting):
    """Integer scores (many ties: the older position wins) and all-zero scores (weights fall back to the mean)."""
    view = make_view(seed=5, P=30, pads=(0, 4, 9))
    g = torch.Generator().manual_seed(2)
    for scores in (torch.randint(0, 3, (3, 1, 30), generator=g).float(), torch.zeros(3, 1, 30)):
        keep = budget_keep(view, 0.6)
        red = AnchorMerge(weighting=weighting).reduce(view, scores, torch.tensor(keep))
        assert_same_rows(reduction_rows(view, red), naive_anchor_merge(view, scores, keep, weighting=weighting))


def test_anchor_merge_protects_sinks_and_last_and_never_keeps_pads():
    view = make_view(seed=7, P=20, pads=(0, 5, 12))
    scores = -view.positions[:, :1].float()  # oldest best: the last token would never win on its score
    keep = budget_keep(view, 0.5)
    rows = reduction_rows(view, AnchorMerge(start_size=2).reduce(view, scores, torch.tensor(keep)))
    for b, p in enumerate((0, 5, 12)):
        kept = [r[0] for r in rows[b, 0]]
        assert kept[:2] == [p, p + 1] and kept[-1] == 19 and min(kept) >= p


@pytest.mark.parametrize("keep", [1, 2, 3])
def test_anchor_merge_tiny_budgets(keep):
    """Budgets that leave no room for anchors: protected tokens only, truncated to the budget, nothing merged."""
    view = make_view(seed=8, P=10, pads=(0, 2, 4))
    scores = torch.rand(3, 1, 10, generator=torch.Generator().manual_seed(0))
    red = AnchorMerge(start_size=2).reduce(view, scores, torch.full((3,), keep))
    assert_same_rows(reduction_rows(view, red), naive_anchor_merge(view, scores, [keep] * 3, start_size=2))


def test_anchor_merge_keeps_rows_under_budget_untouched_and_half_precision():
    view = make_view(seed=9, P=16, pads=(0, 10, 3))
    view.keys, view.values = view.keys.to(torch.bfloat16), view.values.to(torch.bfloat16)
    scores = torch.rand(3, 1, 16, generator=torch.Generator().manual_seed(1))
    keep = torch.tensor([8, 6, 20])  # row 1 holds 6 real tokens, row 2 holds 13 < 20: both untouched
    red = AnchorMerge().reduce(view, scores, keep)
    assert red.keys.dtype == torch.bfloat16 and torch.isfinite(red.keys.float()).all()
    rows = reduction_rows(view, red)
    for b in (1, 2):
        assert [r[0] for r in rows[b, 0]] == [int(view.positions[b, 0, j]) for j in row_slots(view, b, 0)]
        for pos, k, v in rows[b, 0]:
            assert torch.equal(k, view.keys[b, 0, pos])
    # row 0 against the reference computed in float32 from the same bf16 inputs (float32 sums, one final rounding)
    ref = naive_anchor_merge(dataclasses.replace(view, keys=view.keys.float(), values=view.values.float()), scores,
                             keep.tolist())
    for (pos, k, v), (_, ek, ev) in zip(rows[0, 0], ref[0, 0]):
        torch.testing.assert_close(k, ek.to(torch.bfloat16), atol=0, rtol=0)
        torch.testing.assert_close(v, ev.to(torch.bfloat16), atol=0, rtol=0)


def test_anchor_merge_rejects_nan_scores():
    view = make_view()
    scores = torch.rand(3, 1, view.num_slots)
    scores[1, 0, 10] = float("nan")
    with pytest.raises(FloatingPointError):
        AnchorMerge().reduce(view, scores, torch.tensor([5, 5, 5]))


# ---------------------------------------------------------------------------------------------- the authors' quirks


def authors_prefill(k, v, score_sum, ratio, start_size, distance=-25):
    """``ElasticCache.__call__`` of liuzuyan/ElasticCache@3138e03 for one layer at prefill, batch 1, line by line.

    ``k``/``v`` ``[1, H, T, D]``, ``score_sum`` ``[T]`` (the layer's row of ``self.score_sum``)."""
    protect_size = 1
    seq_len = k.size(2)
    num_of_token = seq_len
    forget_num = int(seq_len - num_of_token * (1 - ratio))
    assert forget_num > 1  # the prefill branch
    selected_idx = torch.where(torch.argsort(score_sum[start_size:(seq_len - protect_size)]) > forget_num)[0] + start_size
    throw_idx = torch.where(torch.argsort(score_sum[start_size:(seq_len - protect_size)]) <= forget_num)[0]
    merge_idx = []
    for i in range(len(throw_idx)):
        merge_idx.append(selected_idx[torch.abs(selected_idx - throw_idx[i]).argmin()].unsqueeze(0))
    merge_idx = torch.cat(merge_idx)

    selected_idx = torch.cat([torch.arange(start_size), selected_idx, torch.tensor([seq_len - protect_size])], dim=0)

    if distance > 0:
        drop_index = distance
    else:
        drop_index = seq_len - forget_num + distance

    k_forget = k.gather(dim=-2, index=throw_idx.view(1, 1, -1, 1).expand(k.shape[0], k.shape[1], -1, k.shape[-1]))
    v_forget = v.gather(dim=-2, index=throw_idx.view(1, 1, -1, 1).expand(v.shape[0], v.shape[1], -1, v.shape[-1]))

    k = k.scatter_reduce(-2, merge_idx.view(1, 1, -1, 1).expand(k.shape[0], k.shape[1], -1, k.shape[-1]), k_forget, "mean")
    v = v.scatter_reduce(-2, merge_idx.view(1, 1, -1, 1).expand(v.shape[0], v.shape[1], -1, v.shape[-1]), v_forget, "mean")

    k_new = k.gather(dim=-2, index=selected_idx.view(1, 1, -1, 1).expand(k.shape[0], k.shape[1], -1, k.shape[-1]))
    v_new = v.gather(dim=-2, index=selected_idx.view(1, 1, -1, 1).expand(v.shape[0], v.shape[1], -1, v.shape[-1]))
    return selected_idx, k_new, v_new, drop_index


ALL_QUIRKS = {"quirk_rank_by_index": True, "quirk_off_by_one": True, "quirk_shifted_merge": True}


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("ratio", [0.2, 0.35, 0.5])
@pytest.mark.parametrize("start_size", [1, 4])
def test_all_quirks_reproduce_the_authors_code(seed, ratio, start_size):
    t = 40 + 7 * seed if seed < 6 else 12 + 5 * seed  # the last two: short prompts, a negative frozen index
    view = make_view(B=1, H=2, P=t, pads=(0,), seed=seed)
    score_sum = torch.rand(t, generator=torch.Generator().manual_seed(100 + seed))
    keep = Budget(ratio=ratio).prefill_keep(view.n_tokens)
    red = AnchorMerge(start_size=start_size, **ALL_QUIRKS).reduce(view, score_sum.view(1, 1, t), keep)
    sel, k_ref, v_ref, drop_index = authors_prefill(view.keys, view.values, score_sum, ratio, start_size)
    kept = red.index[0, 0][red.valid[0, 0]]
    assert kept.tolist() == sel.tolist()
    assert red.valid.sum(-1).tolist() == [[len(sel)] * 2]
    torch.testing.assert_close(red.keys[:, :, : len(sel)], k_ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(red.values[:, :, : len(sel)], v_ref, atol=1e-6, rtol=1e-6)
    # the naive reference with every quirk on is the same thing
    expected = naive_anchor_merge(view, score_sum.view(1, 1, t), keep.tolist(), start_size, rank_by_index=True,
                                  off_by_one=True, shifted=True)
    assert_same_rows(reduction_rows(view, red), expected)
    # and the decode index: the authors' `seq_len - forget_num + distance` as it is with quirk_raw_index; in paper
    # mode never below the sinks (a negative one would count from the newest entry in their slicing)
    prefill_kept = red.valid.sum(-1)
    assert DistanceOffset(offset=-25, quirk_raw_index=True).drop_index(prefill_kept).tolist() == [[drop_index] * 2]
    assert DistanceOffset(offset=-25).drop_index(prefill_kept, start_size).tolist() == [
        [max(start_size, drop_index)] * 2
    ]


@pytest.mark.parametrize("start_size", [1, 4])
@pytest.mark.parametrize("t", [6, 9, 14])
def test_authors_prefill_crashes_without_room_for_anchors(start_size, t):
    """Their prefill needs an anchor: with keep <= start_size + 2 (keep = T - forget_num) `selected_idx` is empty
    and `argmin` on it raises. kvpolicy keeps the protected tokens (the paper's edge rule) instead."""
    ratio = 0.75
    keep = Budget(ratio=ratio).prefill_keep(torch.tensor([t]))
    forget_num = int(t - t * (1 - ratio))
    assert forget_num > 1 and int(keep) == t - forget_num
    view = make_view(B=1, H=2, P=t, pads=(0,), seed=t)
    score_sum = torch.rand(t, generator=torch.Generator().manual_seed(t))
    if int(keep) <= start_size + 2:
        with pytest.raises((RuntimeError, IndexError)):
            authors_prefill(view.keys, view.values, score_sum, ratio, start_size)
    else:
        authors_prefill(view.keys, view.values, score_sum, ratio, start_size)
    red = AnchorMerge(start_size=start_size, **ALL_QUIRKS).reduce(view, score_sum.view(1, 1, t), keep)
    expected = naive_anchor_merge(view, score_sum.view(1, 1, t), keep.tolist(), start_size, rank_by_index=True,
                                  off_by_one=True, shifted=True)
    assert_same_rows(reduction_rows(view, red), expected)


QUIRK_SUBSETS = [
    {"quirk_rank_by_index": r, "quirk_off_by_one": o, "quirk_shifted_merge": s}
    for r in (False, True)
    for o in (False, True)
    for s in (False, True)
]


@pytest.mark.parametrize("quirks", QUIRK_SUBSETS, ids=lambda q: "+".join(k[6:] for k, v in q.items() if v) or "none")
@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize(
    "options", [{}, {"start_size": 3, "assign": "cosine", "weighting": "score"}], ids=["paper", "opts"]
)
def test_each_quirk_matches_naive_per_row(quirks, per_head, options):
    """Each quirk on its own and combined, per row of a left-padded batch (the authors' code itself is batch 1)."""
    view = make_view(seed=21, P=32, pads=(0, 5, 11), shuffle=True)
    scores = torch.rand(3, 2 if per_head else 1, 32, generator=torch.Generator().manual_seed(4))
    keep = budget_keep(view, 0.3)
    red = AnchorMerge(**options, **quirks).reduce(view, scores, torch.tensor(keep))
    expected = naive_anchor_merge(
        view, scores, keep, **options, rank_by_index=quirks["quirk_rank_by_index"],
        off_by_one=quirks["quirk_off_by_one"], shifted=quirks["quirk_shifted_merge"],
    )
    assert_same_rows(reduction_rows(view, red), expected)


def test_rank_by_index_is_near_chance_and_paper_rule_is_top_k():
    """The quirk's kept set overlaps the true top-k about as much as a random set would; the default is the top-k."""
    t, trials, overlap = 200, 20, []
    for seed in range(trials):
        view = make_view(B=1, H=1, P=t, pads=(0,), seed=seed)
        s = torch.rand(1, 1, t, generator=torch.Generator().manual_seed(seed))
        keep = torch.tensor([100])
        top = set(s[0, 0, 1 : t - 1].argsort(descending=True)[:98].add(1).tolist())
        paper = AnchorMerge().reduce(view, s, keep)
        quirk = AnchorMerge(quirk_rank_by_index=True).reduce(view, s, keep)

        def anchors(red):
            return set(red.index[0, 0][red.valid[0, 0]].tolist()) - {0, t - 1}

        assert anchors(paper) == top
        overlap.append(len(anchors(quirk) & top) / len(top))
    assert abs(sum(overlap) / trials - 98 / 198) < 0.06  # chance: 98 of 198 candidates


def test_off_by_one_derivation_is_exact_for_ratios_up_to_half():
    """forget_num = T - keep reproduces int(T - T*(1-ratio)) exactly for ratio <= 0.5 (Sterbenz: T - x is exact)."""
    n = torch.arange(1, 4001)
    for i in range(1, 51):
        ratio = i / 100
        keep = Budget(ratio=ratio).prefill_keep(n)
        authors = torch.tensor([t - int(t - t * (1 - ratio)) for t in n.tolist()])
        assert torch.equal(keep, authors.clamp(min=1)), ratio


# ---------------------------------------------------------------------------------------------- decode merge (on_drop)


def test_on_drop_evicts_by_default_and_merges_into_nearest_neighbour():
    view = make_view(seed=13, P=18, pads=(0, 3, 6), stage="decode", shuffle=True)
    # gapped positions, as after a prefill compression
    view.positions = view.positions * 3 + (view.positions % 2)
    victims = torch.tensor([[[7, 2]] * 2, [[9, 10]] * 2, [[12, 0]] * 2])
    ok = torch.tensor([[[True, True]] * 2, [[True, False]] * 2, [[True, True]] * 2])
    ok &= view.valid.gather(2, victims)
    assert AnchorMerge().on_drop(view, victims, ok) is None
    keys, values = AnchorMerge(decode_merge=True).on_drop(view, victims, ok)
    for b in range(3):
        for h in range(2):
            drop = {int(victims[b, h, i]) for i in range(2) if ok[b, h, i]}
            survivors = [j for j in row_slots(view, b, h) if j not in drop]

            def pos(j, b=b, h=h):
                return int(view.positions[b, h, j])

            groups = {j: [] for j in survivors}
            for v in sorted(drop, key=pos):
                best = None
                for j in survivors:  # oldest first, strict: ties to the older neighbour
                    if best is None or abs(pos(j) - pos(v)) < abs(pos(best) - pos(v)):
                        best = j
                groups[best].append(v)
            for j in range(view.num_slots):
                members = [j] + groups.get(j, [])
                ek = sum(view.keys[b, h, m].double() for m in members) / len(members)
                ev = sum(view.values[b, h, m].double() for m in members) / len(members)
                torch.testing.assert_close(keys[b, h, j], ek.float(), atol=1e-6, rtol=1e-6)
                torch.testing.assert_close(values[b, h, j], ev.float(), atol=1e-6, rtol=1e-6)


# ============================================================================================== distance_offset


def decode_view(prefill_kept: list[int], extra: int, pads=(0, 2, 5), seed=0) -> LayerView:
    """A cache after prefill compression (gapped prompt positions) plus ``extra`` generated tokens, slots shuffled."""
    b = len(prefill_kept)
    slots = max(prefill_kept) + extra
    view = make_view(B=b, H=2, P=slots, pads=(0,) * b, seed=seed, stage="decode")
    g = torch.Generator().manual_seed(seed)
    valid = torch.zeros(b, 2, slots, dtype=torch.bool)
    pos = torch.zeros(b, 2, slots, dtype=torch.long)
    for r, k in enumerate(prefill_kept):
        prompt = sorted(torch.randperm(3 * k, generator=g)[:k].add(pads[r]).tolist())
        cols = prompt + list(range(3 * k + pads[r] + 10, 3 * k + pads[r] + 10 + extra))
        perm = torch.randperm(slots, generator=g)[: len(cols)]
        valid[r, :, perm] = True
        pos[r, :, perm] = torch.tensor(cols)
    view.valid, view.positions = valid, pos
    view.prefill_kept = torch.tensor(prefill_kept)[:, None].expand(b, 2).clone()
    return view


@pytest.mark.parametrize("offset", [-25, -3, 1, 7, 500, -500])
def test_distance_offset_freezes_index_and_scores_it_lowest(offset):
    kept = [40, 30, 26]
    view = decode_view(kept, extra=6)
    scorer = DistanceOffset(offset=offset)
    assert scorer.needs == frozenset()
    scorer.after_prefill(view)
    frozen = view.layer_state[elastic.DROP_INDEX_KEY]
    expected = [[k + 1 + offset if offset < 0 else offset] * 2 for k in kept]
    expected = [[max(0, x) for x in row] for row in expected]
    assert frozen.tolist() == expected
    scores = scorer.drop_scores(view)
    for b in range(3):
        for h in range(2):
            slots = row_slots(view, b, h)
            idx = min(expected[b][h], len(slots) - 1)
            by_score = sorted(slots, key=lambda j: float(scores[b, h, j]))
            # the lowest is the entry at the frozen rank; k drops at once == k successive drops at that index
            remaining = list(slots)
            for step in range(3):
                target = remaining[min(idx, len(remaining) - 1)]
                assert by_score[step] == target
                remaining.remove(target)


def test_distance_offset_params():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="non-zero"):
        DistanceOffset(offset=0)
    with pytest.raises(ValidationError):
        AnchorMerge(start_size=-1)
    with pytest.raises(ValidationError):
        AnchorMerge(assign="random")
    with pytest.raises(ValidationError):
        FrequencyScorer(per_hed=True)


# ============================================================================================== end to end: LLaVA

VOCAB, PAD, IMAGE_TOKEN = 128, 0, 127
IMAGE_SIZE, PATCH = 32, 4
IMAGE_TOKENS = (IMAGE_SIZE // PATCH) ** 2  # vision_feature_select_strategy="default" drops CLS: 64 tokens


def build_llava(seed: int = 0):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=IMAGE_SIZE, patch_size=PATCH,
    )
    text = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, pad_token_id=PAD,
    )
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN)
    assert config.vision_feature_select_strategy == "default"
    model = LlavaForConditionalGeneration(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.15)
    return model.eval()


def llava_batch(pads: list[int], length: int = 84, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB - 2, (len(pads), length), generator=g)
    mask = torch.ones(len(pads), length, dtype=torch.long)
    for r, p in enumerate(pads):
        ids[r, p + 3 : p + 3 + IMAGE_TOKENS] = IMAGE_TOKEN
        ids[r, :p] = PAD
        mask[r, :p] = 0
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "pixel_values": torch.randn(len(pads), 3, IMAGE_SIZE, IMAGE_SIZE, generator=g),
    }


@pytest.fixture(scope="module")
def llava():
    model = build_llava()
    kvpolicy.attach(model)
    return model


class RecordingMerge(AnchorMerge):
    """anchor_merge that keeps what it saw at prefill, so the test can rerun the naive reference on it."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.seen: dict[int, tuple] = {}

    def reduce(self, view, scores, keep):
        copy = dataclasses.replace(
            view, keys=view.keys.clone(), values=view.values.clone(), valid=view.valid.clone(),
            positions=view.positions.clone(),
        )
        self.seen[view.layer_idx] = (copy, scores.clone(), keep.clone())
        return super().reduce(view, scores, keep)


def run_generate(model, batch, policy, steps=50):
    from transformers import LogitsProcessorList

    cache = kvpolicy.make_cache(model, policy)
    trace = []  # per step: per layer: (held [B, H] list, kept positions per row and head)

    class Record:
        def __call__(self, input_ids, scores):
            trace.append(
                [
                    (
                        layer.held().tolist(),
                        [[layer.kept_positions(r, h) for h in range(layer.held().shape[1])]
                         for r in range(input_ids.shape[0])],
                        layer.length,
                    )
                    for layer in cache.policy_layers
                ]
            )
            return scores

    out = model.generate(
        **batch, past_key_values=cache, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
        pad_token_id=PAD, logits_processor=LogitsProcessorList([Record()]),
    )
    assert len(trace) == steps
    return out, cache, trace


def expected_held(t: int, ratio: float, steps: int, off_by_one: bool = False) -> tuple[list[int], list[bool]]:
    """The paper's budget rule, computed independently: prefill ceil(T*(1-ratio)), then one drop whenever
    int(P - n*(1-ratio)) >= 1 with P entries (the new one included) and n tokens seen."""
    p = math.ceil(t * (1 - ratio)) - (1 if off_by_one else 0)
    held, drops, n = [p], [False], t
    for _ in range(1, steps):
        n += 1
        p += 1
        excess = int(p - n * (1 - ratio))
        assert excess <= 1
        drops.append(excess >= 1)
        p -= max(0, excess)
        held.append(p)
    return held, drops


def check_trace(trace, pads, length, expected, offset, heads=2):
    """Held counts follow ``expected[row]``; every drop removes the entry at the frozen index."""
    for layer in range(len(trace[0])):
        for r, p in enumerate(pads):
            held, drops = expected[r]
            prefill_kept = held[0]
            idx = prefill_kept + 1 + offset if offset < 0 else offset
            for s in range(len(trace)):
                assert trace[s][layer][0][r] == [held[s]] * heads, (layer, r, s)
                kept = trace[s][layer][1][r]
                assert all(k == kept[0] for k in kept)  # one selection shared by the kv heads
                kept = kept[0]
                assert min(kept) >= p  # never a pad
                if s == 0:
                    assert kept[0] == p and kept[-1] == length - 1  # sink and last prompt token
                    continue
                before = trace[s - 1][layer][1][r][0]
                new_col = length + s - 1
                dropped = set(before) - set(kept)
                assert set(kept) - set(before) == {new_col}
                if drops[s]:
                    assert dropped == {before[min(max(idx, 0), len(before) - 1)]}, (layer, r, s)
                else:
                    assert not dropped


def test_elastic_end_to_end_fraction_budget(llava):
    pads, length, ratio, offset = [0, 6], 84, 0.2, -25
    batch = llava_batch(pads, length)
    reducer = RecordingMerge(start_size=1)
    policy = CachePolicy(
        reducer=reducer, budget=Budget(ratio=ratio), encode=FrequencyScorer(), decode=DistanceOffset(offset=offset),
        name="elastic",
    )
    _, cache, trace = run_generate(llava, batch, policy)
    expected = [expected_held(length - p, ratio, 50) for p in pads]
    assert sum(expected[0][1]) >= 8  # the rule really dropped entries during the 50 steps
    check_trace(trace, pads, length, expected, offset)
    for layer in cache.policy_layers:
        frozen = layer.layer_state[elastic.DROP_INDEX_KEY]
        assert frozen[:, 0].tolist() == [expected[r][0][0] + 1 + offset for r in range(2)]
    # the prefill the engine applied is the naive reference on the very view the reducer saw (merged keys included)
    for i, (view, scores, keep) in reducer.seen.items():
        assert scores.shape == (2, 1, view.num_slots)
        assert keep.tolist() == [math.ceil((length - p) * (1 - ratio)) for p in pads]
        expected_rows = naive_anchor_merge(view, scores, keep.tolist(), start_size=1)
        got = reduction_rows(view, AnchorMerge(start_size=1).reduce(view, scores, keep))
        assert_same_rows(got, expected_rows)
        assert [[r[0] for r in expected_rows[b, 0]] for b in range(2)] == [trace[0][i][1][b][0] for b in range(2)]


def test_elastic_per_head_and_decode_merge_follow_the_rule(llava):
    pads, length, ratio = [3, 0], 84, 0.3
    batch = llava_batch(pads, length, seed=4)
    policy = CachePolicy(
        reducer=AnchorMerge(decode_merge=True, assign="cosine"),
        budget=Budget(ratio=ratio),
        encode=FrequencyScorer(per_head=True, normalize=True),
        decode=DistanceOffset(offset=-10),
    )
    _, cache, trace = run_generate(llava, batch, policy, steps=30)
    expected = [expected_held(length - p, ratio, 30) for p in pads]
    for layer in range(len(trace[0])):
        for r in range(2):
            assert [trace[s][layer][0][r] for s in range(30)] == [[h, h] for h in expected[r][0]]
    for layer in cache.policy_layers:
        assert torch.isfinite(layer.keys).all()


@pytest.mark.parametrize("tokens", [40, 70])
def test_elastic_fixed_token_budget_holds_exact_physical_length(llava, tokens):
    pads, length, offset = [0, 6], 84, -25
    batch = llava_batch(pads, length, seed=2)
    policy = CachePolicy(
        reducer=AnchorMerge(),
        budget=Budget(tokens=tokens),
        encode=FrequencyScorer(),
        decode=DistanceOffset(offset=offset),
    )
    _, cache, trace = run_generate(llava, batch, policy)
    for step in trace:
        for held, _, length_phys in step:
            assert held == [[tokens] * 2] * 2
            assert length_phys == tokens
    for layer in cache.policy_layers:
        assert layer.keys.shape[2] == tokens and layer.capacity == tokens
    expected = [([tokens] * 50, [False] + [True] * 49) for _ in pads]
    check_trace(trace, pads, length, expected, offset)


def test_elastic_ratio_with_fixed_decode(llava):
    """Budget(ratio, decode='fixed'): the cache stays at each row's prefill budget, one drop per step."""
    pads, length, ratio = [0, 6], 84, 0.2
    batch = llava_batch(pads, length, seed=3)
    policy = CachePolicy(
        reducer=AnchorMerge(), budget=Budget(ratio=ratio, decode="fixed"), encode=FrequencyScorer(),
        decode=DistanceOffset(offset=-25),
    )
    _, _, trace = run_generate(llava, batch, policy, steps=20)
    keeps = [math.ceil((length - p) * (1 - ratio)) for p in pads]
    check_trace(trace, pads, length, [([k] * 20, [False] + [True] * 19) for k in keeps], -25)


def test_reference_quirks_end_to_end(llava):
    """Every quirk on (parts and engine): prefill holds keep - 1 entries, the decode rule then follows the paper's
    fraction rule from there, and drops remove the entry at the authors' index T - forget_num + distance."""
    pads, length, ratio, offset = [0], 84, 0.2, -25
    batch = llava_batch(pads, length, seed=6)
    policy = CachePolicy(
        reducer=AnchorMerge(**ALL_QUIRKS), budget=Budget(ratio=ratio), encode=FrequencyScorer(),
        decode=DistanceOffset(offset=offset), drop_after_attention=True, compressed_positions=True,
    )
    _, _, trace = run_generate(llava, batch, policy, steps=30)
    expected = [expected_held(length, ratio, 30, off_by_one=True)]
    check_trace(trace, pads, length, expected, offset)
    forget_num = int(length - length * (1 - ratio))
    assert expected[0][0][0] == length - forget_num - 1


# ============================================================================================== plugin registration


def test_hooks_through_pluggy():
    import pluggy

    from kvpolicy import hookspecs

    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    pm.register(elastic)
    parts = {p.name: p for group in pm.hook.kvpolicy_parts() for p in group}
    assert {(n, p.kind) for n, p in parts.items()} == {
        ("frequency", "encode"), ("anchor_merge", "reducer"), ("distance_offset", "decode"),
    }
    for spec in parts.values():
        part = spec.factory(spec.params())
        assert type(part.params) is spec.params
        assert spec.__doc__ and "ECCV 2024" in type(part).__doc__
        for name, field in spec.params.model_fields.items():
            assert field.description, name
            if name.startswith("quirk_"):
                assert field.annotation is bool and field.default is False
    presets = {p.name: p for group in pm.hook.kvpolicy_presets() for p in group}
    assert presets["elastic"].policy == {
        "encode": {"name": "frequency"},
        "reducer": {"name": "anchor_merge"},
        "decode": {"name": "distance_offset", "offset": -25},
        "ratio": 0.2,
        "sinks": 1,
    }


def test_presets_through_the_registry(llava):
    registry = pytest.importorskip("kvpolicy.registry")
    config = pytest.importorskip("kvpolicy.config")
    reg = registry.Registry(entry_points=())
    assert reg.register_module(elastic, source="kvpolicy") == []
    policy = config.load_policy("elastic", registry=reg)
    assert isinstance(policy.encode, FrequencyScorer) and isinstance(policy.reducer, AnchorMerge)
    assert isinstance(policy.decode, DistanceOffset) and policy.decode.params.offset == -25
    assert policy.reducer.params.start_size == 1 and policy.budget.ratio == 0.2
    assert not policy.drop_after_attention and not policy.compressed_positions
    ref = config.load_policy("elastic_reference", registry=reg)
    assert ref.reducer.params.quirk_rank_by_index and ref.reducer.params.quirk_off_by_one
    assert ref.reducer.params.quirk_shifted_merge and ref.drop_after_attention and ref.compressed_positions
    doc = {"preset": "elastic_reference", "reference_quirks": {"off_by_one": False}}
    one_off = config.load_policy(doc, registry=reg)
    assert not one_off.reducer.params.quirk_off_by_one and one_off.reducer.params.quirk_rank_by_index
    # the preset runs end to end
    _, _, trace = run_generate(llava, llava_batch([0, 6]), policy, steps=10)
    check_trace(trace, [0, 6], 84, [expected_held(84 - p, 0.2, 10) for p in (0, 6)], -25)


def test_installed_entry_point_finds_the_preset():
    registry = pytest.importorskip("kvpolicy.registry")
    from importlib import metadata

    if not any(ep.name == "elastic" for ep in metadata.entry_points(group="kvpolicy.plugins")):
        pytest.skip("the kvpolicy.plugins entry point is not installed (re-run `pip install -e .`)")
    reg = registry.get_registry(refresh=True)
    assert reg.preset("elastic").spec.policy["ratio"] == 0.2
    assert reg.part("reducer", "anchor_merge").spec.factory is AnchorMerge
