"""KVzip (plugins/kvzip.py) and the engine's probe pass (kvpolicy/core/probe.py) against references written here.

* the probe statistic on a tiny GQA Llama (4 query / 2 kv heads), left-padded batch of 3, several chunks (a row with
  fewer chunks than the others), sinks: equal to a float64 reference that runs each row *alone* through a plain
  model on ``context + chunk`` (no cache), captures the post-RoPE queries and keys of every layer, and takes each
  probe query's softmax over the allowed entries by loops; with prefill positions of generate() and of a plain
  forward (columns);
* with one chunk covering the context the statistic equals the model's own eager attention probabilities over
  context + probe (``output_attentions``), max over probe queries and group heads: a naive full-attention check;
* the kernel alone against a loop reference on random tensors with padded probes, in tiny row blocks;
* the probe's entries never survive: the next decode step equals a ``DynamicCache`` built by hand from each row's
  plain prefill with the kept positions (``kvzip`` scores, uniform per-head eviction), and nothing past the prompt;
* the preset's selection across heads keeps the best ``H * keep`` entries of the layer by the statistic, sinks
  included, never a pad; ratio 0 generates exactly the plain cache's tokens and never runs the probe;
* a Gemma 3 text model (sliding layers of 8 columns + a global one): the probe's tokens go through the sliding
  layers under the model's own window — every layer's statistic equals the naive per-row reference, which runs the
  plain model on ``context + chunk`` — and afterwards each sliding layer keeps half of its window, inside it;
* ``kvzip_global`` keeps each layer's largest-remainder share of the row's best entries of all layers;
* the chunks match KVzip's construction (kvpress's ``prepare``), and the errors name their fix.
"""

from __future__ import annotations

import math

import pytest
import torch
from kvpolicy_plugins.kvzip import FIRST_PROMPT, NEXT_PROMPT, KVzipProbe
from transformers import AttentionInterface, DynamicCache
from transformers.masking_utils import AttentionMaskInterface, eager_mask
from transformers.models.llama.modeling_llama import eager_attention_forward

import kvpolicy
from kvpolicy.config import load_policy
from kvpolicy.core.kernels import probe_max_received
from kvpolicy.core.probe import ProbeError
from kvpolicy.testing import TINY_GEMMA_LAYERS, TINY_WINDOW, CharTokenizer, build_model, make_batch

CAPTURED: dict[int, tuple[torch.Tensor, torch.Tensor, float]] = {}


def _capture(module, query, key, value, attention_mask, **kwargs):
    CAPTURED[module.layer_idx] = (query.detach().clone(), key.detach().clone(), kwargs["scaling"])
    return eager_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register("kvzip_test_capture", _capture)
AttentionMaskInterface.register("kvzip_test_capture", eager_mask)  # without one the model gets no causal mask
TOK = CharTokenizer()


@pytest.fixture(scope="module")
def model():
    return kvpolicy.attach(build_model("llama", seed=3))


@pytest.fixture(scope="module")
def reference():
    ref = build_model("llama", seed=3, attn="eager")
    ref.set_attn_implementation("kvzip_test_capture")
    return ref


def kvzip(ratio=0.5, chunk_size=16, n_sink=4, reducer=None, **encode):
    doc = {"preset": "kvzip", "ratio": ratio, "sinks": n_sink, "encode": {"chunk_size": chunk_size, "n_sink": n_sink,
                                                                         **encode}}
    if reducer is not None:
        doc["reducer"] = reducer
    return load_policy(doc)


def prefill(model, policy, batch, generate_positions=True):
    """The policy's prefill (its probe included); returns the cache and the statistics the probe handed over."""
    cache = kvpolicy.make_cache(model, policy, tokenizer=TOK)
    seen: dict = {}
    compress = cache.compress_deferred
    cache.compress_deferred = lambda scores: (seen.update(scores), compress(scores))  # spy
    mask = batch["attention_mask"]
    pos = (mask.cumsum(-1) - 1).clamp(min=0) if generate_positions else None
    with torch.no_grad():
        model(**batch, position_ids=pos, past_key_values=cache, use_cache=True)
    return cache, {i: next(iter(s.values())) for i, s in seen.items()}


def naive_stat(ref, ctx: list[int], chunks, sinks: int, offset: int) -> list[torch.Tensor]:
    """float64 ``[H, n]`` per layer: each context entry's largest probability from the probe queries of the chunk
    that targets it, softmax over the sinks before the chunk, the chunk's entries and the probe up to the query."""
    n = len(ctx)
    out: list[torch.Tensor] = []
    for c in chunks:
        seq = ctx + list(c.ids)
        CAPTURED.clear()
        with torch.no_grad():
            ref(input_ids=torch.tensor([seq]), position_ids=torch.arange(len(seq))[None] + offset)
        for layer in sorted(CAPTURED):
            q, k = (t[0].double() for t in CAPTURED[layer][:2])
            scaling = CAPTURED[layer][2]
            hq, h, d = q.shape[0], k.shape[0], q.shape[-1]
            if len(out) <= layer:
                out.append(torch.zeros(h, n, dtype=torch.float64))
            allowed_ctx = list(range(min(sinks, c.start))) + list(range(c.start, c.end))
            for head in range(hq):
                kv = head // (hq // h)
                for i in range(n, len(seq)):
                    cols = allowed_ctx + list(range(n, i + 1))
                    logits = torch.stack([q[head, i] @ k[kv, j] for j in cols]) * scaling
                    p = torch.softmax(logits, 0)
                    for j, pj in zip(cols, p.tolist()):
                        if c.start <= j < c.end:
                            out[layer][kv, j] = max(out[layer][kv, j], pj)
    return out


@pytest.mark.parametrize("generate_positions", [True, False])
@pytest.mark.parametrize("chunk_size", [16, 64])
def test_probe_statistic_matches_naive_per_row(model, reference, generate_positions, chunk_size):
    pads = [0, 5, 11]  # 40, 35 and 29 real tokens: 3, 3 and 2 chunks of 16 (one chunk of 64)
    batch = make_batch(3, 40, pads=pads, seed=2)
    policy = kvzip(chunk_size=chunk_size)
    _, got = prefill(model, policy, batch, generate_positions)
    probe = policy.encode.need.probe
    assert sorted(got) == [0, 1]
    for r, p in enumerate(pads):
        ctx = batch["input_ids"][r, p:].tolist()
        want = naive_stat(reference, ctx, probe.chunks(ctx, TOK), 4, 0 if generate_positions else p)
        for layer, w in enumerate(want):
            torch.testing.assert_close(got[layer][r, :, p:].double(), w, atol=2e-6, rtol=1e-5)
            assert not got[layer][r, :, :p].any()  # pads receive nothing


def test_one_chunk_statistic_is_the_models_full_attention(model):
    """One chunk covering the context: max over probe queries and group heads of the model's eager probabilities."""
    eager = build_model("llama", seed=3, attn="eager")
    batch = make_batch(1, 30, seed=4)
    policy = kvzip(chunk_size=64)
    _, got = prefill(model, policy, batch)
    ctx = batch["input_ids"][0].tolist()
    (chunk,) = policy.encode.need.probe.chunks(ctx, TOK)
    seq = torch.tensor([ctx + list(chunk.ids)])
    with torch.no_grad():
        att = eager(input_ids=seq, output_attentions=True).attentions
    for layer, a in enumerate(att):  # [1, Hq, S, S]
        a = a[0, :, len(ctx) :, : len(ctx)].amax(1)  # [Hq, n]
        want = a.view(2, 2, -1).amax(1)
        torch.testing.assert_close(got[layer][0], want, atol=1e-6, rtol=1e-5)


def test_kernel_matches_loops_in_small_blocks():
    g = torch.Generator().manual_seed(0)
    b, h, grp, k, q, d = 2, 2, 3, 7, 9, 8
    query = torch.randn(b, h * grp, q, d, generator=g)
    ctx = torch.randn(b, h, k, d, generator=g)
    own = torch.randn(b, h, q, d, generator=g)
    ok = torch.rand(b, k, generator=g) > 0.3
    pv = torch.ones(b, q, dtype=torch.bool)
    pv[1, :3] = False  # a left-padded probe row
    got = probe_max_received(query, ctx, ok, own, pv, 0.3, chunk_elements=1, min_rows=1)
    want = torch.zeros(b, h, k, dtype=torch.float64)
    for r in range(b):
        for hh in range(h * grp):
            kv = hh // grp
            for i in range(q):
                if not pv[r, i]:
                    continue
                keys = [ctx[r, kv, j] for j in range(k) if ok[r, j]] + [own[r, kv, j] for j in range(i + 1) if pv[r, j]]
                p = torch.softmax(torch.stack([query[r, hh, i].double() @ x.double() * 0.3 for x in keys]), 0)
                for n, j in enumerate(j for j in range(k) if ok[r, j]):
                    want[r, kv, j] = max(want[r, kv, j], p[n])
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-5)


def test_probe_entries_never_survive_and_the_next_step_matches_a_hand_built_cache(model):
    pads, length = [0, 4], 36
    batch = make_batch(2, length, pads=pads, seed=6)
    policy = kvzip(ratio=0.5, reducer={"name": "evict"})  # uniform per head: a DynamicCache can hold it
    cache, _ = prefill(model, policy, batch)
    mask = batch["attention_mask"]
    k0 = [[[layer.kept_positions(r, h) for h in range(2)] for r in range(2)] for layer in cache.policy_layers]
    for layer in cache.policy_layers:
        assert layer.seen == length and not layer.waiting
        for r, p in enumerate(pads):
            for h in range(2):
                kept = layer.kept_positions(r, h)
                assert len(kept) == math.ceil((length - p) * 0.5)
                assert all(p <= c < length for c in kept) and set(range(p, p + 4)) <= set(kept)  # sinks kept
    tok = torch.tensor([[7], [9]])
    n = mask.sum(-1)
    with torch.no_grad():
        out = model(input_ids=tok, attention_mask=torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1),
                    position_ids=n[:, None], past_key_values=cache, use_cache=True)
    for r, p in enumerate(pads):
        ids = batch["input_ids"][r, p:].tolist()
        full = DynamicCache(config=model.config)
        with torch.no_grad():
            model(input_ids=torch.tensor([ids]), past_key_values=full, use_cache=True)
        ref = DynamicCache(config=model.config)
        for i in range(len(cache.policy_layers)):
            kept = [[c - p for c in k0[i][r][h]] for h in range(2)]
            ks = torch.stack([full.layers[i].keys[0, h, kept[h]] for h in range(2)])
            vs = torch.stack([full.layers[i].values[0, h, kept[h]] for h in range(2)])
            ref.update(ks[None], vs[None], i)
        with torch.no_grad():
            o = model(input_ids=tok[r : r + 1], attention_mask=torch.ones(1, ref.get_seq_length() + 1, dtype=torch.long),
                      position_ids=torch.tensor([[len(ids)]]), past_key_values=ref, use_cache=True)
        torch.testing.assert_close(out.logits[r, -1], o.logits[0, -1], atol=1e-5, rtol=1e-5)


def test_preset_keeps_the_best_entries_across_heads(model):
    pads = [0, 7]
    batch = make_batch(2, 44, pads=pads, seed=8)
    cache, stat = prefill(model, kvzip(ratio=0.6), batch)
    for layer in cache.policy_layers:
        s = stat[layer.layer_idx]
        for r, p in enumerate(pads):
            n = 44 - p
            keep = 2 * math.ceil(n * 0.4)
            score = s[r, :, p:].clone()
            score[:, :4] = float("inf")  # the sinks
            ranked = sorted(((-float(score[h, j]), j, h) for h in range(2) for j in range(n)))[:keep]
            want = {(h, j + p) for _, j, h in ranked}
            got = {(h, c) for h in range(2) for c in layer.kept_positions(r, h)}
            assert got == want


def test_ratio_zero_is_the_plain_cache_and_runs_no_probe(model, monkeypatch):
    batch = make_batch(2, 24, pads=[0, 3], seed=9)
    plain = model.generate(**batch, max_new_tokens=6, do_sample=False)
    calls = []
    monkeypatch.setattr(kvpolicy.core.cache.PolicyCache, "run_probe", lambda self, m: calls.append(1))
    cache = kvpolicy.make_cache(model, kvzip(ratio=0.0), tokenizer=TOK)
    got = model.generate(**batch, past_key_values=cache, max_new_tokens=6, do_sample=False)
    assert torch.equal(got, plain) and not calls


def test_chunks_follow_kvzips_construction():
    ctx = list(range(100, 141))  # 41 tokens: chunks of 16, 16, 9
    chunks = KVzipProbe(16, 8, True, FIRST_PROMPT, NEXT_PROMPT).chunks(ctx, TOK)
    nl = TOK.encode("\n")  # no chat template: the turn change is a newline (kvpress's fallback)
    assert [(c.start, c.end) for c in chunks] == [(0, 16), (16, 32), (32, 41)]
    assert list(chunks[0].ids) == TOK.encode(FIRST_PROMPT) + nl + ctx[:16]
    assert list(chunks[1].ids) == TOK.encode(NEXT_PROMPT) + ctx[8:16] + nl + ctx[16:32]
    assert list(chunks[2].ids) == TOK.encode(NEXT_PROMPT) + ctx[24:32] + nl + ctx[32:]


def test_errors_name_the_fix(model):
    with pytest.raises(ProbeError, match="tokenizer=tokenizer"):
        kvpolicy.make_cache(model, kvzip())
    llava = kvpolicy.attach(build_model("llava"))
    with pytest.raises(kvpolicy.core.cache.UnsupportedModelError, match="vision-language"):
        kvpolicy.make_cache(llava, kvzip(), tokenizer=TOK)
    cache = kvpolicy.make_cache(model, kvzip(), tokenizer=TOK)
    batch = make_batch(1, 30, seed=1)
    with torch.no_grad():
        model.model(**batch, past_key_values=cache, use_cache=True)  # the inner decoder: no hook, no probe
        with pytest.raises(RuntimeError, match="waiting prefill stage"):
            model.model(input_ids=torch.tensor([[5]]), past_key_values=cache, use_cache=True)


def naive_shares(counts: list[int], heads: int, total: int) -> list[int]:
    """Largest remainder by hand: floor(count / heads), then +1 to the largest remainders (lower layer first)."""
    base = [c // heads for c in counts]
    rest = sorted(range(len(counts)), key=lambda i: (-(counts[i] / heads - base[i]), i))
    for i in rest[: total - sum(base)]:
        base[i] += 1
    return base


def test_global_budget_keeps_each_layers_share_of_the_best_entries(model):
    """kvzip_global: a layer keeps (per head, rounded) its count among the row's best entries of all layers, and
    within the layer the best entries across heads; the row's total is the uniform total."""
    pads = [0, 6]
    batch = make_batch(2, 48, pads=pads, seed=11)
    policy = load_policy({"preset": "kvzip_global", "ratio": 0.7, "encode": {"chunk_size": 20}})
    cache, stat = prefill(model, policy, batch)
    layers = cache.policy_layers
    for r, p in enumerate(pads):
        n = 48 - p
        per_layer = math.ceil(n * 0.3)
        scored = []
        for layer in layers:
            s = stat[layer.layer_idx][r, :, p:].clone()
            s[:, :4] = float("inf")
            scored += [(-float(s[h, j]), layer.layer_idx, j, h) for h in range(2) for j in range(n)]
        best = sorted(scored, key=lambda t: t[0])[: 2 * per_layer * len(layers)]  # stable: lower layer first on ties
        shares = naive_shares([sum(1 for t in best if t[1] == i) for i in range(len(layers))], 2,
                              per_layer * len(layers))
        for layer, share in zip(layers, shares):
            got = {(h, c) for h in range(2) for c in layer.kept_positions(r, h)}
            assert len(got) == 2 * share
            mine = sorted(t for t in scored if t[1] == layer.layer_idx)[: 2 * share]
            assert got == {(h, j + p) for _, _, j, h in mine}


def test_global_budget_refuses_a_budget_that_grows(model):
    from kvpolicy_plugins.global_budget import GlobalBudget

    from kvpolicy.core.partcheck import PartError, check_rebalanced

    policy = load_policy({"preset": "kvzip_global", "ratio": 0.5})
    keep = [torch.tensor([3, 4]), torch.tensor([3, 4])]
    with pytest.raises(PartError, match="total budget"):
        check_rebalanced(policy, [torch.tensor([3, 5]), torch.tensor([3, 4])], keep, [0, 1])
    valid = [torch.ones(2, 2, 6, dtype=torch.bool)] * 2
    scores = [torch.rand(2, 2, 6), torch.rand(2, 2, 6)]
    out = GlobalBudget().rebalance(scores, valid, keep)
    assert torch.equal(out[0] + out[1], keep[0] + keep[1])


def test_gemma3_probe_passes_the_sliding_layers_under_their_window():
    """Gemma 3 (sliding layers of TINY_WINDOW columns around a global one): every layer waits with the whole prompt, the
    probe's tokens attend through the sliding layers under the model's own window (so the statistic of every layer,
    the later global one included, equals the naive reference running the plain model on context + chunk), and then
    each sliding layer keeps half of the real tokens of its window, all inside it. Rows of 36 and 24 real tokens in
    chunks of 12: the shorter row repeats its last chunk, so no row's chunk is padded (a padded chunk would shift a
    sliding window by its padding columns, transformers' convention for left-padded batches)."""
    gemma = kvpolicy.attach(build_model("gemma3", seed=4))
    ref = build_model("gemma3", seed=4, attn="eager")
    ref.set_attn_implementation("kvzip_test_capture")
    pads, length = [0, 12], 36
    batch = make_batch(2, length, pads=pads, seed=3)
    policy = kvzip(chunk_size=12)
    cache, got = prefill(gemma, policy, batch)
    probe = policy.encode.need.probe
    assert sorted(got) == list(range(len(TINY_GEMMA_LAYERS)))
    for r, p in enumerate(pads):
        ctx = batch["input_ids"][r, p:].tolist()
        want = naive_stat(ref, ctx, probe.chunks(ctx, TOK), 4, 0)
        for layer, w in enumerate(want):
            torch.testing.assert_close(got[layer][r, :, p:].double(), w, atol=2e-6, rtol=1e-5)
    for layer, kind in zip(cache.policy_layers, TINY_GEMMA_LAYERS):  # one ranking across the 2 kv heads of a layer
        for r, p in enumerate(pads):
            kept = [layer.kept_positions(r, h) for h in range(2)]
            if kind == "sliding_attention":
                assert sum(map(len, kept)) == 2 * TINY_WINDOW // 2
                assert all(c >= length - TINY_WINDOW for k in kept for c in k)
            else:
                assert sum(map(len, kept)) == 2 * math.ceil((length - p) * 0.5)
                assert all(set(range(p, p + 4)) <= set(k) for k in kept)  # the sinks stay



@pytest.mark.parametrize("weight", [0.0, 0.5, 3.0])
def test_window_option_adds_the_windows_mean_attention_to_the_probe_score(weight):
    """``window``: score = probe max + weight x (attention summed over the last ``window`` real queries / their
    number), sinks +inf, pads ignored — a loop over rows, heads and slots."""
    from kvpolicy.core.policy import AttentionStat
    from kvpolicy.testing import make_view

    scorer = kvzip(window=4, window_weight=weight, chunk_size=16).encode
    assert scorer.needs == {scorer.need, AttentionStat(4)}
    assert kvzip().encode.needs == {kvzip().encode.need}  # KVzip as published reads no prompt attention
    view = make_view(windows=(4,), seed=9)
    g = torch.Generator().manual_seed(1)
    probe = torch.rand(view.valid.shape, generator=g).masked_fill(~view.valid, 0.0)
    view.probe = {scorer.need: probe}
    view.sinks = 4  # what the engine hands every part: the policy's sinks
    got = scorer.score(view)
    for b in range(view.batch_size):
        n = int(view.n_tokens[b])
        for h in range(view.num_heads):
            rank = 0
            for j in sorted(range(view.num_slots), key=lambda j: int(view.positions[b, h, j])):
                if not bool(view.valid[b, h, j]):
                    continue
                want = float(probe[b, h, j]) + weight * float(view.attention[4][b, h, j]) / min(4, n)
                if rank < 4:  # the policy's sinks
                    want = float("inf")
                assert float(got[b, h, j]) == pytest.approx(want, rel=1e-6), (b, h, j)
                rank += 1


def test_window_option_through_a_replayed_prefill_equals_the_direct_path(model):
    """The probe and the window statistic together, shared-prefill path against the direct one: same kept entries."""
    from kvpolicy.core.recording import record
    from kvpolicy.core.replay import replay

    batch = make_batch(2, 40, pads=[0, 6], seed=4)
    pos = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)

    def forward(cache):
        with torch.inference_mode():
            return model(**batch, position_ids=pos, past_key_values=cache, use_cache=True).logits

    direct = kvpolicy.make_cache(model, kvzip(ratio=0.7, window=6, window_weight=2.0), tokenizer=TOK)
    forward(direct)
    plain = kvpolicy.make_cache(model, kvzip(ratio=0.7), tokenizer=TOK)
    forward(plain)
    with torch.inference_mode():
        replayed = replay(model, kvzip(ratio=0.7, window=6, window_weight=2.0), record(model, forward),
                          whole_model=False, tokenizer=TOK)
    def kept(layer):  # any layout (per-head budgets may leave the layer bucketed)
        return [layer.kept_positions(r, h) for r in range(2) for h in range(layer.held().shape[1])]

    differs = False
    for a, b, c in zip(direct.policy_layers, replayed.policy_layers, plain.policy_layers):
        assert kept(a) == kept(b)
        differs |= kept(a) != kept(c)
    assert differs  # the window term changed what was kept
