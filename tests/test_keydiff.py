"""KeyDiff (plugins/keydiff.py) and H2O's ``normalize`` option against naive references.

* the ``keydiff`` scorers against a reference written here with Python loops over the rows, kv heads and positions
  of random views (left padding, freed and shuffled slots, per-head layouts, sinks, ``per_head`` off, TEXT
  protection): the same scores (float64 reference, atol 1e-5) and the same kept positions;
* the ``keydiff`` preset on a tiny random GQA Llama (4 query / 2 kv heads, left-padded batch): exactly its budget,
  never a pad, the kept positions equal the reference applied to the keys of a plain transformers prefill; ratio 0
  generates exactly what the plain cache generates;
* ``h2o``'s ``normalize: mean_over_visible`` against a reference that divides each column sum by the number of
  real queries at or after the entry's column (kvpress's ``ObservedAttentionPress``), at prefill and while decoding.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from kvpolicy_plugins.evict import Evict
from kvpolicy_plugins.h2o import H2ODecode, H2OScorer
from kvpolicy_plugins.keydiff import KeyDiffDecode, KeyDiffScorer
from transformers import DynamicCache

import kvpolicy
from kvpolicy import TEXT, LayerView
from kvpolicy.config import load_policy
from kvpolicy.core.selection import ranked_slots
from kvpolicy.parts import ATTENTION_SUM
from kvpolicy.testing import build_model, make_batch, make_view

INF = float("inf")
LAYOUTS = [
    {},
    {"shuffle": True, "holes": 2},
    {"shuffle": True, "holes": 3, "per_head_layout": True, "seed": 5},
    {"B": 2, "H": 4, "P": 23, "D": 16, "pads": (0, 9), "holes": 4, "shuffle": True, "seed": 7},
]


# ============================================================================================ naive references


def entries(view: LayerView, b: int, h: int) -> list[tuple[int, int]]:
    """(position, slot) of the valid entries of row ``b``, kv head ``h``, oldest first."""
    return sorted((int(view.positions[b, h, s]), s) for s in range(view.num_slots) if bool(view.valid[b, h, s]))


def naive_keydiff_head(view: LayerView, b: int, h: int) -> dict[int, float]:
    """slot -> ``-cos(k, mean of the normalised valid keys)`` for one row and kv head, in float64 Python."""
    keys = {s: [float(x) for x in view.keys[b, h, s]] for _, s in entries(view, b, h)}
    d = view.keys.shape[-1]
    anchor = [0.0] * d
    for k in keys.values():
        n = math.sqrt(sum(x * x for x in k))
        for i in range(d):
            anchor[i] += k[i] / n / len(keys)
    na = math.sqrt(sum(x * x for x in anchor))
    out = {}
    for s, k in keys.items():
        nk = math.sqrt(sum(x * x for x in k))
        out[s] = -sum(x * y for x, y in zip(k, anchor)) / (nk * na)
    return out


def naive_keydiff(view: LayerView, b: int, h: int, per_head: bool = True, protect_text: bool = False) -> list[float]:
    """Scores of the valid entries of row ``b``, head ``h``, oldest first (the sinks and protected text: inf)."""
    ents = entries(view, b, h)
    if per_head:
        per = naive_keydiff_head(view, b, h)
        scores = [per[s] for _, s in ents]
    else:
        heads = [naive_keydiff_head(view, b, hh) for hh in range(view.num_heads)]
        scores = [sum(hd[s] for hd in heads) / len(heads) for _, s in ents]
    scores = [INF if i < view.sinks else x for i, x in enumerate(scores)]
    if protect_text:
        scores = [INF if int(view.token_types[b, h, s]) == TEXT else x for (_, s), x in zip(ents, scores)]
    return scores


def naive_top(scores: list[float], positions: list[int], keep: int) -> list[int]:
    """Positions of the ``keep`` best scores (ties to the older position), sorted."""
    best = sorted(zip(scores, positions), key=lambda sp: (-sp[0], sp[1]))[:keep]
    return sorted(p for _, p in best)


def kept_by(view: LayerView, red, b: int, h: int) -> list[int]:
    idx = red.index[b, h][red.valid[b, h]]
    return sorted(view.positions[b, h, idx].tolist())


def check_scores_and_selection(view: LayerView, scores: torch.Tensor, naive, **kw) -> None:
    keep = (view.held()[:, 0] + 1) // 2
    red = Evict().reduce(view, scores, keep)
    full = scores.expand(view.batch_size, view.num_heads, view.num_slots)
    for b in range(view.batch_size):
        for h in range(view.num_heads):
            ents = entries(view, b, h)
            want = naive(view, b, h, **kw)
            got = [float(full[b, h, s]) for _, s in ents]
            for g, w in zip(got, want):
                assert (g == w == INF) or abs(g - w) < 1e-5, (b, h, got, want)
            pos = [p for p, _ in ents]
            assert kept_by(view, red, b, h) == naive_top(want, pos, min(int(keep[b]), len(ents))), (b, h)


# ============================================================================================ keydiff parts


# a head-mean ranking presumes the heads share a layout, so a per-head layout is only paired with per-head scoring
LAYOUT_PER_HEAD = [(lay, ph) for ph in (True, False) for lay in LAYOUTS if ph or not lay.get("per_head_layout")]


@pytest.mark.parametrize("layout,per_head", LAYOUT_PER_HEAD)
@pytest.mark.parametrize("sinks", [0, 2])
def test_keydiff_matches_naive(layout, sinks, per_head):
    view = dataclasses.replace(make_view(**layout), sinks=sinks)
    scorer = KeyDiffScorer(per_head=per_head)
    assert scorer.needs == frozenset()  # attention-free: runs under SDPA / flash untouched
    check_scores_and_selection(view, scorer.score(view), naive_keydiff, per_head=per_head)
    # decode: the victim is the entry with the lowest naive score (the sinks never)
    decode = KeyDiffDecode(per_head=per_head)
    assert decode.needs == frozenset()
    victim = ranked_slots(view, -decode.drop_scores(view))[..., 0]
    for b in range(view.batch_size):
        for h in range(view.num_heads):
            ents = entries(view, b, h)
            want = naive_keydiff(view, b, h, per_head=per_head)
            lowest = min(zip(want, [p for p, _ in ents]), key=lambda sp: (sp[0], sp[1]))[1]
            assert int(view.positions[b, h, victim[b, h]]) == lowest
            assert sinks == 0 or lowest not in [p for p, _ in ents[:sinks]]


def test_keydiff_pads_never_count_in_the_anchor():
    """Garbage in pad and freed slots (huge keys) changes no score: the anchor is the mean over valid entries only."""
    view = make_view(shuffle=True, holes=2, seed=3)
    base = KeyDiffScorer().score(view)
    noisy = dataclasses.replace(view, keys=torch.where(view.valid[..., None], view.keys, 1e4))
    got = KeyDiffScorer().score(noisy)
    assert torch.equal(torch.where(view.valid, got, 0.0), torch.where(view.valid, base, 0.0))


def test_keydiff_protect_text():
    view = make_view(shuffle=True, holes=1, seed=11)
    scores = KeyDiffScorer(protect_text=True).score(view)
    check_scores_and_selection(view, scores, naive_keydiff, protect_text=True)


# ============================================================================================ end to end


@pytest.fixture(scope="module")
def model():
    return kvpolicy.attach(build_model("llama"))


def keydiff_policy(ratio: float):
    policy = load_policy({"preset": "keydiff", "ratio": ratio})
    assert isinstance(policy.encode, KeyDiffScorer) and isinstance(policy.reducer, Evict) and policy.decode is None
    return policy


def test_preset_holds_its_budget_keeps_no_pad_and_matches_naive(model):
    pads, length, ratio = [0, 5], 24, 0.5
    batch = make_batch(2, length, pads, seed=2)
    cache = kvpolicy.make_cache(model, keydiff_policy(ratio))
    plain = DynamicCache(config=model.config)
    with torch.no_grad():
        model(**batch, past_key_values=cache, use_cache=True)
        model(**batch, past_key_values=plain, use_cache=True)
    for i, layer in enumerate(cache.policy_layers):
        keys = plain.layers[i].keys  # [B, H, T, D], post-RoPE, the pads' columns included
        for r, p in enumerate(pads):
            n = length - p
            keep = math.ceil(n * (1 - ratio))
            assert layer.held()[r].tolist() == [keep, keep], (i, r)
            for h in range(keys.shape[1]):
                kept = layer.kept_positions(r, h)
                assert min(kept) >= p and len(set(kept)) == keep  # never a pad column, no duplicate
                k = keys[r, h, p:].to(torch.float64)
                unit = k / k.norm(dim=-1, keepdim=True)
                anchor = unit.mean(0)
                score = -(unit @ anchor) / anchor.norm()
                want = naive_top(score.tolist(), list(range(p, length)), keep)
                assert kept == want, (i, r, h)


def test_preset_ratio_zero_is_identical_to_the_plain_cache(model):
    batch = make_batch(2, 16, [0, 3], seed=4)
    kw = {"max_new_tokens": 6, "min_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    expected = model.generate(**batch, **kw)
    cache = kvpolicy.make_cache(model, keydiff_policy(0.0))
    assert torch.equal(model.generate(**batch, past_key_values=cache, **kw), expected)


# ============================================================================================ h2o normalize


def naive_mean_over_visible(view: LayerView, b: int, h: int, current_forward: bool) -> list[float]:
    """Column sums divided by the real queries at or after each entry's column (oldest first, no window)."""
    first = view.seen - int(view.n_tokens[b])  # the row's first real column
    if current_forward:
        first = max(first, view.seen - view.new_tokens)
    out = []
    for p, s in entries(view, b, h):
        visible = sum(1 for c in range(max(p, first), view.seen))
        out.append(float(view.attention[None][b, h, s]) / max(visible, 1))
    return out


@pytest.mark.parametrize("layout", LAYOUTS[:3])
def test_h2o_mean_over_visible_matches_naive(layout):
    view = make_view(**layout)
    scorer = H2OScorer(recent=0, normalize="mean_over_visible")
    check_scores_and_selection(view, scorer.score(view), naive_mean_over_visible, current_forward=True)
    # the default is the paper's sum: the statistic as is
    assert torch.equal(H2OScorer(recent=0).score(view), view.attention[None])
    # while decoding: the accumulator over every real query since the prompt (a decode view: 1 new token)
    dec_view = make_view(**layout, stage="decode")
    dec_view.slot_state[ATTENTION_SUM] = dec_view.attention[None].clone()
    scores = H2ODecode(recent=0, normalize="mean_over_visible").drop_scores(dec_view)
    check_scores_and_selection(dec_view, scores, naive_mean_over_visible, current_forward=False)


def test_h2o_mean_over_visible_on_a_prefix_forward():
    """A forward that adds only the last columns (``new_tokens`` < ``seen``): only its queries count."""
    view = dataclasses.replace(make_view(shuffle=True, holes=1, seed=9), new_tokens=6)
    scores = H2OScorer(recent=0, normalize="mean_over_visible").score(view)
    check_scores_and_selection(view, scores, naive_mean_over_visible, current_forward=True)


def test_h2o_normalize_rejects_unknown_values():
    with pytest.raises(Exception, match="mean_over_visible"):
        H2OScorer(normalize="mean")
