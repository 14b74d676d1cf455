"""LOOK-M and D2O (plugins/lookm.py, plugins/d2o.py): every part against a naive reference, and a tiny LLaVA end to end.

Naive references loop over the entries of one row and kv head at a time in plain Python (float64 lists): the
selection (recent window, sinks, text prior / image share, ties to the older position), the most similar kept entry
(strict ``>`` over kept entries in positional order), the merge formulas written literally, the row-mean filter and
D2O's EMA threshold. Views are random: GQA with 2 kv heads, batch 3 with left padding (invalid slots), freed slots,
shuffled slots (per row or per row and head), TEXT and IMAGE token types mixed. Kept positions must be identical and
merged keys/values equal to 1e-6 (float32).

End to end: a tiny random LLaVA (conftest ``build_model("llava")``) with ``kvpolicy.attach`` + ``make_cache`` and the
``lookm`` / ``d2o`` presets through ``model.generate`` on a left-padded batch with images: every layer holds exactly
its budget (D2O: the allocator's per-layer budgets), no pad is kept, kept entries carry the right token type, and the
prefill compression of each real layer equals the naive reference applied to that layer's uncompressed view.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from kvpolicy_plugins import d2o as d2o_mod
from kvpolicy_plugins import lookm as lookm_mod
from kvpolicy_plugins.d2o import (
    THRESHOLD_KEY,
    D2OAllocator,
    D2ODecode,
    D2OReducer,
    d2o_budgets,
    layer_densities,
)
from kvpolicy_plugins.lookm import LookMReducer

import kvpolicy
from kvpolicy import GENERATED, IMAGE, TEXT, AttentionStat, LayerView, testing
from kvpolicy import parts as parts_mod
from kvpolicy.config import load_policy
from kvpolicy.parts import ATTENTION_SUM, AccumulatedAttention, HeavyRecentDecode
from kvpolicy.core.selection import ranked_slots
from kvpolicy.testing import IMAGE_TOKEN, PAD, build_model, make_batch

E = math.e

# ============================================================================================== random views


def make_view(**kw) -> LayerView:
    """:func:`kvpolicy.testing.make_view` with this file's defaults: 16 slots, the prompt attention statistic only."""
    return testing.make_view(**{"P": 16, "windows": (None,), **kw})


LAYOUTS = {
    "plain": {},
    "shuffled": {"shuffle": True, "holes": 2, "seed": 3},
    "per_head": {"shuffle": True, "holes": 3, "per_head_layout": True, "seed": 5},
}


# ============================================================================================== naive references


class Row:
    """One row and kv head of a view as plain Python data."""

    def __init__(self, view: LayerView, b: int, h: int):
        self.b, self.h = b, h
        self.slots = sorted(
            (s for s in range(view.num_slots) if bool(view.valid[b, h, s])), key=lambda s: int(view.positions[b, h, s])
        )
        self.pos = {s: int(view.positions[b, h, s]) for s in self.slots}
        self.image = {s: int(view.token_types[b, h, s]) == IMAGE for s in self.slots}
        self.k = {s: [float(x) for x in view.keys[b, h, s].tolist()] for s in self.slots}
        self.v = {s: [float(x) for x in view.values[b, h, s].tolist()] for s in self.slots}


def cosine(a: list[float], c: list[float]) -> float:
    na = max(math.sqrt(sum(x * x for x in a)), 1e-12)
    nc = max(math.sqrt(sum(x * x for x in c)), 1e-12)
    return sum(x * y for x, y in zip(a, c)) / (na * nc)


def naive_select(row: Row, score, keep: int, start_size=0, recent=None, recent_share=0.5, text_prior=False,
                 image_share=None) -> list[int]:
    """The kept slots of one row and head (``score(slot)``: the scorer's value)."""
    t = len(row.slots)
    k = min(keep, t)
    r = min(recent, k) if recent is not None else math.floor(k * recent_share)
    window = row.slots[t - r:] if r else []
    s = max(0, min(start_size, k - r))
    sinks = row.slots[:s]
    cands = row.slots[s:t - r]
    h = k - r - s

    def top(pool, q):
        return sorted(pool, key=lambda x: (-score(x), row.pos[x]))[:q]

    if image_share is None and not text_prior:
        heavy = top(cands, h)
    else:
        ct = [x for x in cands if not row.image[x]]
        ci = [x for x in cands if row.image[x]]
        if image_share is None:
            qt = min(len(ct), h)
            qi = min(len(ci), h - qt)
        else:
            i0 = sum(1 for x in sinks + window if row.image[x])
            qi = min(max(math.floor(k * image_share) - i0, 0), h, len(ci))
            qt = min(len(ct), h - qi)
            qi = min(len(ci), h - qt)
        heavy = top(ct, qt) + top(ci, qi)
    kept = sinks + window + heavy
    assert len(kept) == k and len(set(kept)) == k
    return kept


def naive_assign(row: Row, kept: list[int], sources: list[int]) -> dict[int, tuple[int, float]]:
    """source slot -> (most similar kept slot, cosine); ties to the older kept entry."""
    targets = sorted(kept, key=lambda s: row.pos[s])
    out = {}
    for e in sources:
        best, best_u = None, None
        for c in targets:
            u = cosine(row.k[e], row.k[c])
            if best_u is None or u > best_u:
                best, best_u = c, u
        out[e] = (best, best_u)
    return out


def combine(xc: list[float], members: list[tuple[list[float], float]], strategy: str) -> list[float]:
    """The merge formulas, literally."""
    n = len(members)
    out = []
    for d in range(len(xc)):
        if strategy == "average":
            out.append((xc[d] + sum(x[d] for x, _ in members)) / (1 + n))
        elif strategy == "pivotal":
            out.append((xc[d] + sum((x[d] + xc[d]) / 2 for x, _ in members)) / (1 + n))
        elif strategy == "weighted":
            out.append((xc[d] + sum(u * x[d] for x, u in members)) / (1 + n))
        elif strategy == "softmax":
            out.append((E * xc[d] + sum(math.exp(u) * x[d] for x, u in members)) / (E + sum(math.exp(u) for _, u in members)))
        else:
            raise AssertionError(strategy)
    return out


def naive_merge(rows: dict, kept: dict, sources: dict, strategy: str, filt=None):
    """Merge ``sources[(b, h)]`` into ``kept[(b, h)]`` for every row and head.

    ``filt``: None, ``"mean"`` (LOOK-M quirk: similarity >= the row's mean over all heads) or ``("tau", prev, ema)``
    (D2O: per-row threshold ``prev[b]`` (None: unset) updated with the row mean before filtering).
    Returns ({(b, h): {slot: (key, value)}} for the kept slots, {b: tau} for D2O)."""
    assign = {bh: naive_assign(rows[bh], kept[bh], sources[bh]) for bh in rows}
    batch = sorted({b for b, _ in rows})
    taus = {}
    for b in batch:
        sims = [u for (bb, _), a in assign.items() if bb == b for (_, u) in a.values()]
        m = sum(sims) / len(sims) if sims else None
        if isinstance(filt, tuple):
            prev, ema = filt[1].get(b), filt[2]
            if m is None:
                taus[b] = prev
            else:
                taus[b] = m if prev is None else ema * prev + (1 - ema) * m
        elif filt == "mean":
            taus[b] = m
    out = {}
    for (b, h), row in rows.items():
        groups = {c: [] for c in kept[(b, h)]}
        for e, (c, u) in assign[(b, h)].items():
            if filt is not None and (taus[b] is None or u < taus[b]):
                continue
            groups[c].append((e, u))
        res = {}
        for c, members in groups.items():
            if not members or strategy == "none":
                res[c] = (row.k[c], row.v[c])
            else:
                res[c] = (
                    combine(row.k[c], [(row.k[e], u) for e, u in members], strategy),
                    combine(row.v[c], [(row.v[e], u) for e, u in members], strategy),
                )
        out[(b, h)] = res
    return out, taus


def check_reduction(view: LayerView, red, expected: dict) -> None:
    """The Reduction keeps exactly the expected slots (by position) with the expected keys and values (1e-6)."""
    for (b, h), want in expected.items():
        got = {slot: (key, value) for slot, key, value in testing.kept_entries(view, red, b, h)}
        pos = view.positions[b, h].tolist()
        assert sorted(pos[s] for s in got) == sorted(pos[s] for s in want), f"kept positions differ at {(b, h)}"
        for slot, (k, v) in want.items():
            gk, gv = got[slot]
            torch.testing.assert_close(gk, torch.tensor(k, dtype=gk.dtype), atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(gv, torch.tensor(v, dtype=gv.dtype), atol=1e-6, rtol=1e-6)


def expected_reduce(view, scores, keep, select_kw, strategy, filt=None):
    rows, kept, sources = {}, {}, {}
    for b in range(view.batch_size):
        for h in range(view.num_heads):
            row = Row(view, b, h)
            hs = h if scores.shape[1] > 1 else 0
            ks = naive_select(row, lambda s, b=b, hs=hs: float(scores[b, hs, s]), int(keep[b]), **select_kw)
            rows[(b, h)], kept[(b, h)] = row, ks
            sources[(b, h)] = [s for s in row.slots if s not in ks]
    return naive_merge(rows, kept, sources, strategy, filt)


def rand_scores(view: LayerView, per_head: bool, seed: int = 11, ties: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    s = torch.rand(view.batch_size, view.num_heads if per_head else 1, view.num_slots, generator=g)
    return (s * 3).floor() if ties else s


def keep_of(view: LayerView, ratio: float) -> torch.Tensor:
    return torch.tensor([max(1, math.ceil(int(n) * (1 - ratio))) for n in view.held()[:, 0].tolist()])


SELECT_KEYS = ("start_size", "recent", "recent_share", "text_prior", "image_share")


def select_kw(params) -> dict:
    return {k: getattr(params, k) for k in SELECT_KEYS if hasattr(params, k)}


# ============================================================================================== lookm reducer


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("merge", ["average", "pivotal", "weighted", "none"])
@pytest.mark.parametrize("per_head", [True, False])
def test_lookm_reduce_matches_naive(layout, merge, per_head):
    view = make_view(**LAYOUTS[layout])
    scores = rand_scores(view, per_head)
    keep = keep_of(view, 0.5)
    part = LookMReducer(merge=merge)
    red = part.reduce(view, scores, keep)
    want, _ = expected_reduce(view, scores, keep, select_kw(part.params), merge)
    check_reduction(view, red, want)
    if merge == "none":
        assert red.keys is None and red.values is None


OPTIONS = [
    {"text_prior": False},
    {"image_share": 0.5},
    {"image_share": 0.0, "recent_share": 0.25},
    {"image_share": 1.0, "start_size": 2},
    {"recent": 3, "start_size": 1},
    {"recent_share": 0.0, "text_prior": False, "merge": "average"},
    {"recent_share": 1.0},
    {"quirk_mean_filter": True, "merge": "weighted"},
    {"quirk_mean_filter": True, "merge": "average", "image_share": 0.3},
]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("layout,ratio", [("shuffled", 0.5), ("per_head", 0.8), ("plain", 0.3)])
def test_lookm_options_match_naive(options, layout, ratio):
    view = make_view(**LAYOUTS[layout])
    scores = rand_scores(view, per_head=True, ties=ratio == 0.3)  # integer scores: ties go to the older entry
    keep = keep_of(view, ratio)
    part = LookMReducer(**options)
    red = part.reduce(view, scores, keep)
    filt = "mean" if part.params.quirk_mean_filter else None
    want, _ = expected_reduce(view, scores, keep, select_kw(part.params), part.params.merge, filt)
    check_reduction(view, red, want)
    for b in range(view.batch_size):  # exactly the budget, per row and head
        assert red.valid[b].sum(-1).tolist() == [min(int(keep[b]), int(n)) for n in view.held()[b]]


def test_similarity_chunks_give_the_same_result(monkeypatch):
    view = make_view(**LAYOUTS["per_head"])
    scores, keep = rand_scores(view, True), keep_of(view, 0.7)
    whole = LookMReducer(merge="weighted").reduce(view, scores, keep)
    monkeypatch.setattr(parts_mod, "SIM_CHUNK_ELEMENTS", 3 * 2 * 16 * 2)  # two source rows per chunk
    chunked = LookMReducer(merge="weighted").reduce(view, scores, keep)
    assert torch.equal(whole.index, chunked.index) and not torch.equal(whole.values, view.values.gather(
        2, whole.index[..., None].expand(*whole.index.shape, 8)))  # something was merged
    torch.testing.assert_close(whole.values, chunked.values, atol=1e-6, rtol=1e-6)  # matmul blocking may round apart
    torch.testing.assert_close(whole.keys, chunked.keys, atol=1e-6, rtol=1e-6)


def test_lookm_text_prior_and_image_share_semantics():
    """Text first: with enough text candidates no image entry outside the window survives; with image_share the
    image entries hold floor(share * budget) of the row."""
    view = make_view(P=24, pads=(0, 2, 5), seed=7)
    scores = torch.where(view.token_types == IMAGE, 10.0, 0.0).float()  # images would win on score alone
    keep = keep_of(view, 0.5)
    red = LookMReducer(recent_share=0.0).reduce(view, scores, keep)
    for b in range(3):
        for h in range(2):
            idx = red.index[b, h][red.valid[b, h]]
            types = view.token_types[b, h, idx]
            n_text = int(((view.token_types[b, h] != IMAGE) & view.valid[b, h]).sum())
            assert int((types != IMAGE).sum()) == min(n_text, int(keep[b]))
    red = LookMReducer(recent_share=0.0, image_share=0.25, text_prior=False).reduce(view, -scores, keep)
    for b in range(3):
        idx = red.index[b, 0][red.valid[b, 0]]
        assert int((view.token_types[b, 0, idx] == IMAGE).sum()) == math.floor(0.25 * int(keep[b]))


def test_lookm_keeps_rows_under_budget_untouched_and_rejects_nan():
    view = make_view(seed=9)
    keep = torch.tensor([100, 100, 100])
    red = LookMReducer().reduce(view, rand_scores(view, True), keep)
    for b in range(3):
        for h in range(2):
            assert int(red.valid[b, h].sum()) == int(view.held()[b, h])
    assert red.keys is None  # nothing evicted, nothing merged
    bad = rand_scores(view, True)
    bad[1, 0, 9] = float("nan")
    with pytest.raises(FloatingPointError):
        LookMReducer().reduce(view, bad, keep_of(view, 0.5))


def drop_victims(view: LayerView, k: int, seed: int):
    """Random decode victims: ``k`` per row and head (valid slots), the last one of row 1 marked not ok."""
    g = torch.Generator().manual_seed(seed)
    victims = ranked_slots(view, torch.rand(view.batch_size, view.num_heads, view.num_slots, generator=g))[..., :k]
    ok = view.valid.gather(-1, victims).clone()
    ok[1, :, -1] = False
    return victims, ok


def expected_drop(view, victims, ok, strategy, filt=None):
    rows, kept, sources = {}, {}, {}
    for b in range(view.batch_size):
        for h in range(view.num_heads):
            row = Row(view, b, h)
            gone = {int(victims[b, h, i]) for i in range(victims.shape[-1]) if bool(ok[b, h, i])}
            rows[(b, h)] = row
            kept[(b, h)] = [s for s in row.slots if s not in gone]
            sources[(b, h)] = [s for s in row.slots if s in gone]
    return naive_merge(rows, kept, sources, strategy, filt)


def check_full(view: LayerView, keys, values, want: dict) -> None:
    for (b, h), res in want.items():
        for slot, (k, v) in res.items():
            torch.testing.assert_close(keys[b, h, slot], torch.tensor(k, dtype=keys.dtype), atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(values[b, h, slot], torch.tensor(v, dtype=values.dtype), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("merge", ["average", "pivotal", "weighted"])
@pytest.mark.parametrize("layout", ["shuffled", "per_head"])
def test_lookm_on_drop_matches_naive(merge, layout):
    view = make_view(**LAYOUTS[layout], stage="decode")
    victims, ok = drop_victims(view, 3, seed=4)
    keys, values = LookMReducer(merge=merge).on_drop(view, victims, ok)
    check_full(view, keys, values, expected_drop(view, victims, ok, merge)[0])
    assert LookMReducer(merge=merge, decode_merge=False).on_drop(view, victims, ok) is None
    assert LookMReducer(merge="none").on_drop(view, victims, ok) is None


# ============================================================================================== d2o reducer


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("code_weights", [False, True])
@pytest.mark.parametrize("options", [{}, {"start_size": 0, "recent_share": 0.25}, {"recent": 2, "start_size": 6}])
def test_d2o_reduce_matches_naive(layout, code_weights, options):
    view = make_view(**LAYOUTS[layout], P=18)
    scores = rand_scores(view, per_head=layout != "plain")
    keep = keep_of(view, 0.6)
    part = D2OReducer(quirk_code_weights=code_weights, **options)
    view.layer_state[THRESHOLD_KEY] = torch.full((3,), 5.0, dtype=torch.float64)  # stale: a prefill resets it
    red = part.reduce(view, scores, keep)
    strategy = "weighted" if code_weights else "softmax"
    want, taus = expected_reduce(view, scores, keep, select_kw(part.params), strategy, ("tau", {}, part.params.ema))
    check_reduction(view, red, want)
    got = view.layer_state[THRESHOLD_KEY]
    for b in range(3):
        assert math.isclose(float(got[b]), taus[b], rel_tol=1e-6, abs_tol=1e-7)
    merged_any = any(
        not torch.equal(red.values[b, h, i], view.values[b, h, int(red.index[b, h, i])])
        for b in range(3) for h in range(2) for i in range(red.index.shape[-1]) if bool(red.valid[b, h, i])
    )
    assert merged_any  # the threshold let some entries through (and, being a mean, filtered others)


@pytest.mark.parametrize("ema", [0.5, 0.9, 0.0])
def test_d2o_threshold_is_an_ema_over_decode_drops(ema):
    """Prefill sets tau to the mean best similarity; each decode drop updates it before filtering."""
    view = make_view(**LAYOUTS["shuffled"], P=18)
    part = D2OReducer(ema=ema)
    keep = keep_of(view, 0.5)
    scores = rand_scores(view, True)
    part.reduce(view, scores, keep)
    taus = {b: float(view.layer_state[THRESHOLD_KEY][b]) for b in range(3)}
    for step in range(3):
        dview = make_view(**{**LAYOUTS["per_head"], "seed": 20 + step}, P=18, stage="decode")
        dview.layer_state = view.layer_state  # the engine hands the same per-layer dict every step
        victims, ok = drop_victims(dview, 1 + step, seed=30 + step)
        out = part.on_drop(dview, victims, ok)
        want, new_taus = expected_drop(dview, victims, ok, "softmax", ("tau", taus, ema))
        if out is None:  # nothing passed the threshold: every entry unchanged
            out = (dview.keys, dview.values)
        check_full(dview, *out, want)
        for b in range(3):
            assert math.isclose(float(dview.layer_state[THRESHOLD_KEY][b]), new_taus[b], rel_tol=1e-6, abs_tol=1e-7)
        taus = new_taus


def test_d2o_on_drop_without_prefill_state_starts_the_threshold():
    view = make_view(**LAYOUTS["plain"], stage="decode")
    victims, ok = drop_victims(view, 2, seed=8)
    out = D2OReducer(quirk_code_weights=True).on_drop(view, victims, ok)
    want, _ = expected_drop(view, victims, ok, "weighted", ("tau", {}, 0.5))
    check_full(view, *out, want)
    assert D2OReducer(decode_merge=False).on_drop(view, victims, ok) is None


# ============================================================================================== scorers


@pytest.mark.parametrize("per_head", [True, False])
def test_accumulated_attention_scorer(per_head):
    view = make_view(**LAYOUTS["shuffled"])
    part = AccumulatedAttention(per_head=per_head)
    assert part.needs == frozenset({AttentionStat(None)})
    att = view.attention[None]
    want = att if per_head else att.mean(1, keepdim=True)
    torch.testing.assert_close(part.score(view), want)
    view.attention = {}
    with pytest.raises(RuntimeError, match="window=None"):
        part.score(view)


def naive_victims(view: LayerView, start_size, recent, recent_share, text_prior, k) -> dict:
    out = {}
    acc = view.slot_state[ATTENTION_SUM]
    for b in range(view.batch_size):
        for h in range(view.num_heads):
            row = Row(view, b, h)
            t = len(row.slots)
            budget = int(view.prefill_kept[b, h])
            r = min(recent, budget) if recent is not None else math.floor(budget * recent_share)
            free = [s for i, s in enumerate(row.slots) if i >= start_size and i < t - r]
            image, pos = row.image, row.pos
            ranked = sorted(
                free, key=lambda s: ((0 if image[s] else 1) if text_prior else 0, float(acc[b, h, s]), pos[s])
            )
            out[(b, h)] = [row.pos[s] for s in ranked[:k]]
    return out


@pytest.mark.parametrize(
    "cls,kw",
    [
        (HeavyRecentDecode, {}),
        (HeavyRecentDecode, {"text_prior": False, "start_size": 2}),
        (HeavyRecentDecode, {"recent": 3}),
        (D2ODecode, {}),
        (D2ODecode, {"recent_share": 0.2, "start_size": 1, "text_prior": True}),
    ],
)
def test_decode_scorers_drop_like_naive(cls, kw):
    view = make_view(**LAYOUTS["per_head"], P=20, stage="decode")
    g = torch.Generator().manual_seed(2)
    view.slot_state = {ATTENTION_SUM: torch.rand(3, 2, 20, generator=g).masked_fill(~view.valid, 0.0)}
    view.prefill_kept = (view.held() - 1).clamp(min=1)  # the new token made the row one over its budget
    part = cls(**kw)
    assert part.needs == frozenset({AttentionStat(1)}) and part.prefill_needs == frozenset({AttentionStat(None)})
    prm = part.params
    victims = ranked_slots(view, -part.drop_scores(view))[..., :2]
    want = naive_victims(view, prm.start_size, prm.recent, prm.recent_share, prm.text_prior, 2)
    for (b, h), pos in want.items():
        assert [int(view.positions[b, h, s]) for s in victims[b, h]] == pos, (b, h)


# ============================================================================================== d2o allocation


def naive_density(att: torch.Tensor, mask: torch.Tensor | None) -> float:
    """Column sums over real queries, unbiased variance over real keys, mean over rows, min-max over heads, mean."""
    b_, hq, n, _ = att.shape
    per_head = []
    for h in range(hq):
        vs = []
        for b in range(b_):
            real = [j for j in range(n) if mask is None or bool(mask[b, j])]
            cols = [sum(float(att[b, h, i, j]) for i in real) for j in real]
            mu = sum(cols) / len(cols)
            vs.append(sum((c - mu) ** 2 for c in cols) / (len(cols) - 1))
        per_head.append(sum(vs) / len(vs))
    lo, hi = min(per_head), max(per_head)
    return sum((v - lo) / (hi - lo + 1e-6) for v in per_head) / hq


def test_layer_densities_match_naive():
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, :2] = 0
    atts = [torch.softmax(torch.randn(2, 4, 7, 7, generator=g) * s, -1) for s in (0.5, 3.0)]
    got = layer_densities(atts, mask)
    for a, x in zip(atts, got):
        assert math.isclose(x, naive_density(a, mask), rel_tol=1e-9)
    assert all(0.0 <= x < 1.0 for x in got)
    assert math.isclose(layer_densities(atts[:1])[0], naive_density(atts[0], None), rel_tol=1e-9)


@pytest.mark.parametrize(
    "v,keep,n", [([0.1, 0.5, 0.9, 0.3], 10, 40), ([0.0, 1.0], 30, 32), ([0.2] * 5, 7, 9), ([3.0, 0.0, 0.0], 5, 6)]
)
def test_d2o_budgets_sum_to_uniform_total_and_follow_softmax(v, keep, n):
    got = d2o_budgets(v, keep, n)
    L = len(v)
    assert sum(got) == L * keep and all(1 <= x <= n for x in got)
    w = [math.exp(-x) for x in v]
    for i in range(L):  # denser (lower variance) never gets less
        for j in range(L):
            if w[i] > w[j]:
                assert got[i] >= got[j]
    uncapped = [i for i in range(L) if got[i] < n]
    if len(uncapped) == L:  # nothing capped: within one entry of 1 + L (keep - 1) softmax(-v)
        for i in range(L):
            assert abs(got[i] - (1 + L * (keep - 1) * w[i] / sum(w))) < 1.0
    if len(set(v)) == 1:
        assert got == [keep] * L


def test_d2o_allocator_per_row_uniform_default_and_quirk():
    keep, n = torch.tensor([10, 6]), torch.tensor([40, 12])
    v = [0.1, 0.9, 0.5, 0.4]
    alloc = D2OAllocator(variances=v)
    rows = torch.stack([alloc.layer_keep(i, 4, keep, n) for i in range(4)])
    assert rows[:, 0].tolist() == d2o_budgets(v, 10, 40) and rows[:, 1].tolist() == d2o_budgets(v, 6, 12)
    assert D2OAllocator().layer_keep(2, 4, keep, n).tolist() == [10, 6]
    quirk = D2OAllocator(variances=v, quirk_skip_layers=True)
    assert [quirk.layer_keep(i, 4, keep, n).tolist()[0] for i in range(4)] == [40, 40, rows[2, 0].item(), 40]
    with pytest.raises(ValueError, match="3 variances"):
        D2OAllocator(variances=[0.1, 0.2, 0.3]).layer_keep(0, 4, keep, n)


# ============================================================================================== end to end (LLaVA)

LENGTH, PADS = 28, [0, 3]
GEN = {"do_sample": False, "pad_token_id": PAD}


def registry():
    """The installed registry, plus these two modules if the installed entry points lack them (a stale install):
    the end-to-end tests check behaviour; test_parts_documented_and_presets_load checks the installation."""
    from kvpolicy.registry import Registry

    reg = Registry()
    for mod, name in ((lookm_mod, "lookm"), (d2o_mod, "d2o")):
        if name not in reg.presets():
            reg.register_module(mod, source="kvpolicy")
    return reg


@pytest.fixture(scope="module")
def llava():
    return kvpolicy.attach(build_model("llava"))


class Recording:
    """Wraps a reducer: keeps a copy of every prefill view it compresses (to replay the naive reference on it)."""

    def __init__(self, inner):
        self.inner = inner
        self.views: dict[int, tuple[LayerView, torch.Tensor, torch.Tensor]] = {}

    def reduce(self, view, scores, keep):
        snap = copy.copy(view)
        for name in ("keys", "values", "valid", "positions", "token_types"):
            setattr(snap, name, getattr(view, name).clone())
        snap.layer_state = {}
        self.views[view.layer_idx] = (snap, scores.clone(), keep.clone())
        return self.inner.reduce(view, scores, keep)

    def on_drop(self, view, victims, ok):
        return self.inner.on_drop(view, victims, ok)


def check_types_and_pads(cache, batch) -> None:
    ids = batch["input_ids"]
    for layer in cache.policy_layers:
        n = layer.length
        for r, p in enumerate(PADS):
            for h in range(2):
                valid = layer.valid[r, h, :n]
                pos = layer.positions[r, h, :n][valid].tolist()
                types = layer.token_types[r, h, :n][valid].tolist()
                assert min(pos) >= p  # never a pad column
                for c, t in zip(pos, types):
                    want = GENERATED if c >= LENGTH else (IMAGE if int(ids[r, c]) == IMAGE_TOKEN else TEXT)
                    assert t == want, (c, t)


@pytest.mark.parametrize(
    "doc",
    [
        {"preset": "lookm", "ratio": 0.5},
        {"preset": "lookm", "ratio": 0.5, "reducer": {"image_share": 0.5, "merge": "weighted"}},
        {"preset": "d2o", "ratio": 0.5, "allocator": {"variances": [0.2, 0.9]}},
    ],
    ids=["lookm", "lookm_image_share", "d2o"],
)
def test_llava_generate_holds_budget_and_prefill_equals_naive(llava, doc):
    batch = make_batch(len(PADS), LENGTH, PADS, seed=2, image=True)
    policy = load_policy(doc, registry=registry())
    rec = Recording(policy.reducer)
    policy.reducer = rec
    cache = kvpolicy.make_cache(llava, policy)
    out = llava.generate(**batch, past_key_values=cache, max_new_tokens=5, min_new_tokens=5, **GEN)
    assert out.shape == (2, LENGTH + 5)
    layers = cache.policy_layers
    n_real = [LENGTH - p for p in PADS]
    keep = [math.ceil(n * (1 - doc["ratio"])) for n in n_real]
    variances = doc.get("allocator", {}).get("variances")
    for i, layer in enumerate(layers):
        assert layer.seen == LENGTH + 4
        want = [d2o_budgets(variances, k, n)[i] if variances else k for k, n in zip(keep, n_real)]
        assert layer.held().tolist() == [[w, w] for w in want], i  # fixed budget: exactly the (layer's) budget
    if variances:
        assert layers[0].held()[0, 0] != layers[1].held()[0, 0]  # really per-layer budgets
        for layer in layers:  # decode drops ran through on_drop and carried the threshold
            assert torch.isfinite(layer.layer_state[THRESHOLD_KEY]).all()
    check_types_and_pads(cache, batch)

    # the prefill compression of each real layer equals the naive reference on that layer's uncompressed view
    inner = rec.inner
    for i, (view, scores, keep_t) in rec.views.items():
        assert view.token_types[view.valid].eq(IMAGE).any()  # image entries typed in the real view
        red = type(inner)(inner.params).reduce(view, scores, keep_t)
        if isinstance(inner, LookMReducer):
            want, _ = expected_reduce(view, scores, keep_t, select_kw(inner.params), inner.params.merge)
        else:
            strategy = "weighted" if inner.params.quirk_code_weights else "softmax"
            want, _ = expected_reduce(view, scores, keep_t, select_kw(inner.params), strategy, ("tau", {}, 0.5))
        check_reduction(view, red, want)
        if doc.get("reducer", {}).get("image_share") is not None:
            for b, k in enumerate(keep_t.tolist()):
                idx = red.index[b, 0][red.valid[b, 0]]
                assert int((view.token_types[b, 0, idx] == IMAGE).sum()) == math.floor(0.5 * k)


def test_llava_prefill_cache_holds_the_merged_tensors(llava):
    """After prefill only, the cache's entries are exactly the reducer's merged keys/values."""
    batch = make_batch(len(PADS), LENGTH, PADS, seed=2, image=True)
    policy = load_policy({"preset": "lookm", "ratio": 0.6}, registry=registry())
    rec = Recording(policy.reducer)
    policy.reducer = rec
    cache = kvpolicy.make_cache(llava, policy)
    mask = batch["attention_mask"]
    with torch.no_grad():
        llava(**batch, position_ids=(mask.cumsum(-1) - 1).clamp(min=0), past_key_values=cache, use_cache=True)
    for layer in cache.policy_layers:
        view, scores, keep = rec.views[layer.layer_idx]
        want, _ = expected_reduce(view, scores, keep, select_kw(rec.inner.params), "pivotal")
        for (b, h), res in want.items():
            by_pos = {int(view.positions[b, h, s]): kv for s, kv in res.items()}
            n = layer.length
            valid = layer.valid[b, h, :n]
            assert sorted(layer.positions[b, h, :n][valid].tolist()) == sorted(by_pos)
            for j in torch.nonzero(valid).flatten().tolist():
                k, v = by_pos[int(layer.positions[b, h, j])]
                torch.testing.assert_close(layer.keys[b, h, j], torch.tensor(k), atol=1e-6, rtol=1e-6)
                torch.testing.assert_close(layer.values[b, h, j], torch.tensor(v), atol=1e-6, rtol=1e-6)


# ============================================================================================== registration


def test_parts_documented_and_presets_load():
    from kvpolicy import BudgetAllocator, DecodeScorer, EncodeScorer, Reducer
    from kvpolicy.registry import Registry

    protocols = {"encode": EncodeScorer, "decode": DecodeScorer, "reducer": Reducer, "allocator": BudgetAllocator}
    specs = lookm_mod.kvpolicy_parts() + d2o_mod.kvpolicy_parts()
    assert {(s.kind, s.name) for s in specs} == {
        ("encode", "lookm"), ("decode", "lookm"), ("reducer", "lookm"),
        ("encode", "d2o"), ("decode", "d2o"), ("reducer", "d2o"), ("allocator", "d2o"),
    }
    reg = Registry()
    assert {"lookm", "d2o"} <= set(reg.presets()), (
        "the installed kvpolicy.plugins entry points lack lookm/d2o: re-run `pip install --no-deps "
        "--no-build-isolation -e .`; a stale ./kvpolicy.egg-info shadows the installed metadata when Python runs "
        "from the repository root"
    )
    for spec in specs:
        for fname, info in spec.params.model_fields.items():
            assert info.description, f"{spec.name}.{fname}"
        part = spec.factory(spec.params())
        assert isinstance(part, protocols[spec.kind])
        assert "Wan et al." in (type(part).__doc__ or ""), spec.name
        found, source = reg.part(spec.kind, spec.name)
        assert found == spec and source == "kvpolicy"
    look = load_policy("lookm", registry=reg)
    assert isinstance(look.reducer, LookMReducer) and look.reducer.params.merge == "pivotal"
    assert isinstance(look.decode, HeavyRecentDecode) and look.budget.decode == "fixed" and look.budget.ratio == 0.8
    d2o = load_policy("d2o", registry=reg)
    assert isinstance(d2o.reducer, D2OReducer) and isinstance(d2o.allocator, D2OAllocator)
    assert isinstance(d2o.decode, D2ODecode) and d2o.decode.params.start_size == 4
    quirky = load_policy({"preset": "d2o", "reference_quirks": True}, registry=reg)
    assert quirky.reducer.params.quirk_code_weights and quirky.allocator.params.quirk_skip_layers
