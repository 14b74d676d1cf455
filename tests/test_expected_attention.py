"""Expected Attention (plugins/expected_attention.py) against a naive reference written here.

* the scorer on random views (left padding, freed and shuffled slots, per-head layouts, GQA groups of 2, sinks,
  ``use_covariance``/``use_vnorm`` off, ``per_head`` off) with hand-made query statistics: the reference builds the
  RoPE matrix of every future position explicitly (2x2 blocks), averages them, and computes each slot's softmax
  term and value norm with Python loops in float64;
* the preset on a tiny random GQA Llama (4 query / 2 kv heads, left-padded batch): the kept positions equal the
  reference applied to the pre-RoPE queries captured at ``q_proj`` and to the keys/values of a plain transformers
  prefill; never a pad, always the sinks.
"""

from __future__ import annotations

import math

import pytest
import torch
from kvpolicy_plugins.expected_attention import ExpectedAttentionParams, ExpectedAttentionScorer
from transformers import DynamicCache

import kvpolicy
from kvpolicy.config import load_policy
from kvpolicy.core.querystats import QueryStats, RopeFrequencies
from kvpolicy.testing import build_model, make_batch, make_view

INF = float("inf")


def rotation(inv_freq: list[float], p: int, scaling: float) -> torch.Tensor:
    """float64 ``[D, D]`` RoPE matrix of position ``p`` (transformers' half-split pairs ``(i, i + D/2)``)."""
    half = len(inv_freq)
    m = torch.zeros(2 * half, 2 * half, dtype=torch.float64)
    for i, f in enumerate(inv_freq):
        c, s = math.cos(p * f) * scaling, math.sin(p * f) * scaling
        m[i, i], m[i, i + half], m[i + half, i], m[i + half, i + half] = c, -s, s, c
    return m


def naive_scores(view, mean, cov, nxt, inv_freq, scaling, n_future, use_cov=True, vnorm=True, eps=0.0):
    """``[B, H, P]`` float64: expected attention by loops (sinks +inf, invalid 0)."""
    b_, h_, g_, d = mean.shape
    out = torch.zeros(view.valid.shape, dtype=torch.float64)
    for b in range(b_):
        r = sum(rotation(inv_freq, p, scaling) for p in range(nxt[b], nxt[b] + n_future)) / n_future
        for h in range(h_):
            ents = sorted((int(view.positions[b, h, s]), s) for s in range(view.num_slots) if view.valid[b, h, s])
            sinks = {s for _, s in ents[: view.sinks]}
            cand = [s for _, s in ents if s not in sinks]
            acc = dict.fromkeys(cand, 0.0)
            for g in range(g_):
                mu = r @ mean[b, h, g].double()
                sig = r @ cov[b, h, g].double() @ r.T
                logit = {}
                for s in cand:
                    k = view.keys[b, h, s].double()
                    logit[s] = float(mu @ k) / math.sqrt(d) + (float(k @ sig @ k) / (2 * d) if use_cov else 0.0)
                top = max(logit.values())
                z = sum(math.exp(v - top) for v in logit.values())
                for s in cand:
                    acc[s] += math.exp(logit[s] - top) / z / g_
            for s in cand:
                v = float(view.values[b, h, s].double().norm()) if vnorm else 1.0
                out[b, h, s] = (acc[s] + eps) * v if vnorm else acc[s]
            for s in sinks:
                out[b, h, s] = INF
    return out


LAYOUTS = [
    {},
    {"shuffle": True, "holes": 2},
    {"shuffle": True, "holes": 3, "per_head_layout": True, "seed": 5},
    {"B": 2, "H": 4, "P": 23, "D": 16, "pads": (0, 9), "holes": 4, "shuffle": True, "seed": 7},
]
OPTIONS = [
    {},
    {"use_covariance": False},
    {"use_vnorm": False, "n_future_positions": 3},
    {"epsilon": 0.01, "n_future_positions": 40, "per_head": False},
]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("options", OPTIONS)
def test_scores_equal_naive_reference(layout, options):
    view = make_view(**layout)
    view.sinks = 2
    b, h, _, d = view.keys.shape
    g = torch.Generator().manual_seed(11)
    mean = torch.randn(b, h, 2, d, generator=g)
    a = torch.randn(b, h, 2, d, d, generator=g) * 0.3
    cov = a @ a.transpose(-1, -2)
    nxt = torch.tensor([17, 30, 5][:b])
    inv = (1.0 / (10000.0 ** (torch.arange(0, d, 2, dtype=torch.float64) / d))).tolist()
    rope = RopeFrequencies(torch.tensor(inv, dtype=torch.float64), 1.1)
    prm = ExpectedAttentionParams(n_sink=2, **options)
    scorer = ExpectedAttentionScorer(prm)
    view.queries = {scorer.need: QueryStats(mean, cov, torch.full((b,), 9), nxt, rope)}
    got = scorer.score(view)
    want = naive_scores(
        view, mean, cov, nxt.tolist(), inv, 1.1, prm.n_future_positions, prm.use_covariance, prm.use_vnorm, prm.epsilon
    )
    if not prm.per_head:
        finite = torch.where(torch.isinf(want), 0.0, want)
        want = torch.where(view.sink_mask(), INF, finite.mean(1, keepdim=True).expand_as(want))
    assert got.shape == want.shape
    valid = view.valid
    torch.testing.assert_close(got[valid].double(), want[valid], atol=1e-5, rtol=1e-4)


def test_preset_keeps_what_the_reference_keeps_on_a_real_prefill():
    torch.manual_seed(0)
    model = kvpolicy.attach(build_model("llama").to(torch.float32))
    length, pads, ratio = 20, [0, 3, 6], 0.5
    batch = make_batch(3, length, pads, seed=4)
    caught: dict[int, torch.Tensor] = {}
    hooks = [
        layer.self_attn.q_proj.register_forward_hook(lambda m, a, out, i=i: caught.__setitem__(i, out.detach()))
        for i, layer in enumerate(model.model.layers)
    ]
    policy = load_policy({"preset": "expected_attention", "ratio": ratio, "encode": {"n_future_positions": 16}})
    cache = kvpolicy.make_cache(model, policy)
    plain = DynamicCache(config=model.config)
    with torch.no_grad():
        model(**batch, past_key_values=cache, use_cache=True)
        for hk in hooks:
            hk.remove()
        model(**batch, past_key_values=plain, use_cache=True)
    cfg = model.config
    hq, hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    d = cfg.hidden_size // hq
    inv = (1.0 / (cfg.rope_parameters["rope_theta"] ** (torch.arange(0, d, 2, dtype=torch.float64) / d))).tolist()
    for i, layer in enumerate(cache.policy_layers):
        keys, values = plain.layers[i].keys, plain.layers[i].values
        for r, p in enumerate(pads):
            q = caught[i][r, p + 4 :].double().view(-1, hq, d)  # real queries, the 4 sinks' left out
            mean = q.mean(0).view(1, hkv, hq // hkv, d)
            cen = q - q.mean(0)
            cov = torch.einsum("nhi,nhj->hij", cen, cen).view(1, hkv, hq // hkv, d, d) / q.shape[0]
            view = make_view(B=1, H=hkv, P=length - p, D=d, pads=(0,), windows=())
            view.keys, view.values = keys[r : r + 1, :, p:], values[r : r + 1, :, p:]
            view.sinks = 4
            want = naive_scores(view, mean, cov, [length], inv, 1.0, 16)
            keep = math.ceil((length - p) * (1 - ratio))
            for h in range(hkv):
                order = sorted(range(length - p), key=lambda s: -float(want[0, h, s]))
                assert layer.kept_positions(r, h) == sorted(p + s for s in order[:keep]), (i, r, h)
