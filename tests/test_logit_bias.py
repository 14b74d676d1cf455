"""The per-entry logit bias (``Reduction.logit_bias``): every attention path adds it, and an entry with bias
``log n`` draws exactly the attention of ``n`` copies of itself.

References: a naive float64 softmax for the kernels, and for the engine a plain ``DynamicCache`` in which each kept
entry is *repeated* ``n`` times (proportional attention's defining identity), built per row from a full-cache run of
that row alone, against a left-padded GQA batch run through the policy cache.
"""

from __future__ import annotations

import math

import pytest
import torch
from kvpolicy_plugins.elastic import AnchorMerge
from transformers import DynamicCache

import kvpolicy
from kvpolicy import LOGIT_BIAS, AttentionStat, Budget, CachePolicy, LayerView, Reduction
from kvpolicy.core.kernels import attention_received, grouped_attention, masked_attention_with_received
from kvpolicy.core.partcheck import PartError
from kvpolicy.core.selection import select_top
from kvpolicy.testing import build_model, make_batch, make_view


# ------------------------------------------------------------------------------------------------ kernels
def naive_probs(query, key, mask, bias, scaling):
    """float64 ``[B, Hq, q, P]`` probabilities with the bias added per kv head, masked slots at -inf."""
    b, hq, q, _ = query.shape
    h = key.shape[1]
    g = hq // h
    k = key.double().repeat_interleave(g, dim=1)
    logits = query.double() @ k.transpose(2, 3) * scaling
    if bias is not None:
        logits = logits + bias.double().repeat_interleave(g, dim=1)[:, :, None, :]
    if mask is not None:
        logits = logits.masked_fill(~mask.repeat_interleave(g, dim=1), float("-inf"))
    return torch.softmax(logits, dim=-1).nan_to_num(0.0)


def random_case(q: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    b, hq, h, p, d = 2, 4, 2, 11, 8
    query = torch.randn(b, hq, q, d, generator=g)
    key = torch.randn(b, h, p, d, generator=g)
    value = torch.randn(b, h, p, d, generator=g)
    valid = torch.rand(b, h, p, generator=g) > 0.25
    valid[:, :, 0] = True
    mask = valid[:, :, None, :].expand(b, h, q, p).clone()
    mask[:, :, : q - 1, -1] = False  # the newest slot is invisible to the earlier queries (causal)
    bias = torch.log(torch.randint(1, 5, (b, h, p), generator=g).to(torch.float32))
    return query, key, value, mask, bias


@pytest.mark.parametrize("eager", [False, True])
@pytest.mark.parametrize("q", [1, 3])
@pytest.mark.parametrize("with_mask", [True, False])
def test_grouped_attention_adds_the_bias(eager, q, with_mask):
    query, key, value, mask, bias = random_case(q)
    mask = mask if with_mask else None
    got = grouped_attention(query, key, value, mask, 0.3, eager, bias)
    probs = naive_probs(query, key, mask, bias, 0.3)
    expected = (probs @ value.double().repeat_interleave(2, dim=1)).transpose(1, 2)
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)
    # and the bias matters: without it the outputs differ
    assert not torch.allclose(grouped_attention(query, key, value, mask, 0.3, eager), got, atol=1e-3)


@pytest.mark.parametrize("q", [1, 3])
def test_masked_attention_with_received_adds_the_bias(q):
    query, key, value, mask, bias = random_case(q, seed=1)
    query_valid = torch.tensor([[True] * q, [False] + [True] * (q - 1)])
    out, received = masked_attention_with_received(query, key, value, mask, query_valid, 0.25, bias)
    probs = naive_probs(query, key, mask, bias, 0.25)
    expected_out = (probs @ value.double().repeat_interleave(2, dim=1)).transpose(1, 2)
    torch.testing.assert_close(out.double(), expected_out, atol=1e-5, rtol=1e-5)
    real = probs * query_valid.double()[:, None, :, None]
    expected_rec = real.view(2, 2, 2, q, -1).sum(dim=(2, 3)) / 2
    torch.testing.assert_close(received.double(), expected_rec, atol=1e-6, rtol=1e-5)


def test_attention_received_adds_the_bias_on_a_compressed_layout():
    g = torch.Generator().manual_seed(2)
    b, hq, h, p, q, d = 2, 4, 2, 9, 4, 8
    query, key = torch.randn(b, hq, q, d, generator=g), torch.randn(b, h, p, d, generator=g)
    valid = torch.rand(b, h, p, generator=g) > 0.2
    pos = torch.randperm(p, generator=g).expand(b, h, p).contiguous()  # unordered slots, columns 0..p-1
    cols = torch.arange(p - q, p)
    bias = torch.log(torch.randint(1, 4, (b, h, p), generator=g).to(torch.float32))
    query_valid = torch.ones(b, q, dtype=torch.bool)
    got = attention_received(query, key, valid, pos, cols, query_valid, 0.3, None, bias=bias)
    mask = valid[:, :, None, :] & (pos[:, :, None, :] <= cols[:, None])
    probs = naive_probs(query, key, mask, bias, 0.3)
    torch.testing.assert_close(got.double(), probs.view(b, h, 2, q, p).sum(dim=(2, 3)) / 2, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="compressed layer"):
        attention_received(query, key, valid, pos, cols, query_valid, 0.3, None, first_slot_col=0, bias=bias)


# ------------------------------------------------------------------------------------------------ the engine
def copies(rank: torch.Tensor) -> torch.Tensor:
    """How many tokens a kept entry stands for in these tests: 1, 2 or 3 by its ordinal among the row's tokens."""
    return 1 + rank % 3


class SizedEvict:
    """Keeps the best-scored entries (plain eviction) and states that each stands for ``copies(rank)`` tokens."""

    def reduce(self, view: LayerView, scores: torch.Tensor, keep: torch.Tensor) -> Reduction:
        red = select_top(view, scores, keep)
        red.logit_bias = copies(view.rank()).gather(2, red.index).to(torch.float32).log()
        return red


class Scattered:
    """An encode scorer that keeps the same scattered positions in every layer (so that the reference's layers hold
    equally many copies): by ``(7 * rank) % 11``, two sinks."""

    needs: frozenset = frozenset()

    def score(self, view):
        rank = view.rank()[:, :1]
        return torch.where(rank < 2, float("inf"), ((7 * rank) % 11).to(torch.float32))


class Observer:
    """A decode scorer that reads every step's attention (the fused output+statistics path) and never drops."""

    needs = frozenset({AttentionStat(None)})

    def __init__(self):
        self.seen: list[torch.Tensor] = []

    def observe(self, view):
        self.seen.append(view.attention[None].clone())

    def drop_scores(self, view):
        return view.positions.to(torch.float32)


def positions_of(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp(min=0)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("observe", [False, True])
def test_bias_log_n_equals_n_copies_of_the_entry(attn, observe):
    model = build_model("llama", attn=attn)  # 4 query heads, 2 kv heads
    kvpolicy.attach(model, backend=attn)
    pads, length = [0, 5], 21
    batch = make_batch(2, length, pads, seed=4)
    policy = CachePolicy(
        reducer=SizedEvict(), budget=Budget(ratio=0.5, decode="off"), encode=Scattered(),
        decode=Observer() if observe else None,
    )
    cache = kvpolicy.make_cache(model, policy)
    g = torch.Generator().manual_seed(7)
    chunk = torch.randint(3, 100, (2, 3), generator=g)  # a question appended to the compressed cache
    steps = torch.randint(3, 100, (2, 4), generator=g)  # then one token at a time
    mask = batch["attention_mask"]
    with torch.no_grad():
        model(**batch, position_ids=positions_of(mask), past_key_values=cache, use_cache=True)
        got = []
        for new in [chunk] + [steps[:, s : s + 1] for s in range(4)]:
            mask = torch.cat([mask, torch.ones_like(new)], dim=1)
            pos = positions_of(mask)[:, -new.shape[1] :]
            out = model(input_ids=new, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True)
            got.append(out.logits)
    bias = [layer.logit_bias for layer in cache.policy_layers]
    assert all(b_ is not None and bool((b_ > 0).any()) for b_ in bias)  # the test really exercises a bias
    if observe:
        assert len(policy.decode.seen) > 0
    for r, p in enumerate(pads):
        ids = batch["input_ids"][r : r + 1, p:]
        n = ids.shape[1]
        full = DynamicCache(config=model.config)
        with torch.no_grad():
            model(input_ids=ids, past_key_values=full, use_cache=True)
        ref = DynamicCache(config=model.config)
        for i, layer in enumerate(cache.policy_layers):
            kept = [c - p for c in layer.kept_positions(r, 0) if c < length]  # the prompt's entries
            assert kept == [c - p for c in layer.kept_positions(r, 1) if c < length]  # one ranking for both heads
            rep = copies(torch.tensor(kept))
            k, v = full.layers[i].keys[:, :, kept], full.layers[i].values[:, :, kept]
            ref.update(k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2), i)
        with torch.no_grad():
            held = ref.get_seq_length()
            expected = [model(input_ids=chunk[r : r + 1], position_ids=torch.arange(n, n + 3)[None],
                              attention_mask=torch.ones(1, held + 3, dtype=torch.long), past_key_values=ref,
                              use_cache=True).logits]
            for s in range(4):
                expected.append(model(input_ids=steps[r : r + 1, s : s + 1], position_ids=torch.tensor([[n + 3 + s]]),
                                      past_key_values=ref, use_cache=True).logits)
        for a, e in zip(got, expected):
            torch.testing.assert_close(a[r], e[0], atol=3e-5, rtol=1e-4)


def test_bias_is_kept_through_decode_drops_and_new_entries_start_at_zero():
    model = build_model("qwen2")
    kvpolicy.attach(model)
    batch = make_batch(2, 18, [0, 3], seed=2)
    policy = CachePolicy(reducer=SizedEvict(), budget=Budget(ratio=0.5), encode=Scattered(), decode=Observer())
    cache = kvpolicy.make_cache(model, policy)
    model.generate(**batch, past_key_values=cache, max_new_tokens=6, min_new_tokens=6, do_sample=False,
                   pad_token_id=0)
    for layer in cache.policy_layers:
        bias, valid, pos = layer.logit_bias, layer.valid, layer.positions
        assert layer.slot_state[LOGIT_BIAS] is not None
        for r, p in enumerate([0, 3]):
            for h in range(2):
                for j in torch.nonzero(valid[r, h]).flatten().tolist():
                    col = int(pos[r, h, j])
                    want = 0.0 if col >= 18 else math.log(1 + (col - p) % 3)  # generated: 0; prompt: its size
                    assert float(bias[r, h, j]) == pytest.approx(want, abs=1e-6)


def test_reducer_with_a_bad_bias_is_named():
    class BadBias(SizedEvict):
        def reduce(self, view, scores, keep):
            red = super().reduce(view, scores, keep)
            red.logit_bias = red.logit_bias[..., :-1]
            return red

    model = build_model("llama")
    kvpolicy.attach(model)
    policy = CachePolicy(reducer=BadBias(), budget=Budget(ratio=0.5), encode=Scattered())
    with pytest.raises(PartError, match="logit_bias"):
        model(**make_batch(1, 12), past_key_values=kvpolicy.make_cache(model, policy), use_cache=True)


# ------------------------------------------------------------------------------------------------ anchor_merge
def naive_sizes(view: LayerView, scores: torch.Tensor, keep: list[int], **options) -> dict:
    """Each kept entry's token count under ``anchor_merge``: 1 + the dropped tokens merged into it, by loops over
    the naive merge's groups (the same assignment as tests/test_elastic.py's reference, re-derived here by position)."""
    out = {}
    for b in range(view.batch_size):
        for h in range(view.num_heads):
            slots = [j for j in view.order()[b, h].tolist() if bool(view.valid[b, h, j])]
            t, k = len(slots), keep[b]
            pos = {j: int(view.positions[b, h, j]) for j in slots}
            if k >= t:
                out[b, h] = {pos[j]: 1 for j in slots}
                continue
            sinks, last, cands = slots[:1], slots[-1:], slots[1:-1]
            best = sorted(range(len(cands)), key=lambda i: (-float(scores[b, 0, cands[i]]), i))[: k - 2]
            anchors = [cands[i] for i in sorted(best)]
            sizes = {pos[j]: 1 for j in sinks + anchors + last}
            gate = options.get("min_similarity")
            for src in (c for c in cands if c not in anchors):
                a = min(anchors, key=lambda a: (abs(pos[a] - pos[src]), pos[a]))
                if gate is not None:
                    ka, ks = view.keys[b, h, a].double(), view.keys[b, h, src].double()
                    if float(ka @ ks / (ka.norm() * ks.norm())) < gate:
                        continue
                sizes[pos[a]] += 1
            out[b, h] = sizes
    return out


@pytest.mark.parametrize("options", [{}, {"merge": "values", "min_similarity": 0.2}, {"weighting": "score"}])
def test_anchor_merge_keep_mass_bias_is_log_group_size(options):
    view = make_view(shuffle=True, seed=5)
    g = torch.Generator().manual_seed(3)
    scores = torch.rand(view.batch_size, 1, view.num_slots, generator=g)
    keep = [math.ceil(int(n) * 0.4) for n in view.n_tokens]
    plain = AnchorMerge(**options).reduce(view, scores, torch.tensor(keep))
    red = AnchorMerge(keep_mass=True, **options).reduce(view, scores, torch.tensor(keep))
    assert plain.logit_bias is None
    torch.testing.assert_close(red.keys, plain.keys)  # the option changes the bias only
    torch.testing.assert_close(red.values, plain.values)
    expected = naive_sizes(view, scores, keep, **options)
    for (b, h), sizes in expected.items():
        got = {
            int(view.positions[b, h, j]): math.exp(float(red.logit_bias[b, h, i]))
            for i, j in enumerate(red.index[b, h].tolist())
            if bool(red.valid[b, h, i])
        }
        assert got == pytest.approx(sizes)


def test_anchor_merge_keep_mass_accumulates_earlier_sizes():
    """A second merge counts what an entry already stood for (its bias) and weights the mean by it."""
    view = make_view(seed=6)
    g = torch.Generator().manual_seed(4)
    before = torch.log(torch.randint(1, 4, view.valid.shape, generator=g).to(torch.float32))
    view.slot_state = {LOGIT_BIAS: before}
    scores = torch.rand(view.batch_size, 1, view.num_slots, generator=g)
    keep = [math.ceil(int(n) * 0.5) for n in view.n_tokens]
    red = AnchorMerge(keep_mass=True).reduce(view, scores, torch.tensor(keep))
    size = before.exp()
    held = (size * view.valid).sum(-1)  # tokens the row stood for before, all of them merged or kept (no gate)
    after = (red.logit_bias.exp() * red.valid).sum(-1)
    torch.testing.assert_close(after, held)
    # the merged value is the size-weighted mean: total value mass is conserved too
    v_before = (view.values.double() * (size * view.valid)[..., None]).sum(2)
    v_after = (red.values.double() * (red.logit_bias.exp() * red.valid)[..., None]).sum(2)
    torch.testing.assert_close(v_after, v_before, atol=1e-4, rtol=1e-4)


def test_keep_mass_refuses_decode_merge():
    with pytest.raises(ValueError, match="keep_mass"):
        AnchorMerge(keep_mass=True, decode_merge=True)


# ------------------------------------------------------------------------------------------------ replay
MASS_POLICIES = {
    "elastic": {"preset": "elastic", "reducer": {"keep_mass": True}},
    # the merge-search studies' kind: KVzip's probe and selection, dropped entries merged with the bias
    "kvzip": {"preset": "kvzip", "encode": {"chunk_size": 14},
              "reducer": {"name": "anchor_merge", "start_size": 4, "heads": "shared", "head_floor": 0,
                          "assign": "cosine", "keep_mass": True}},
}


@pytest.mark.parametrize("family", ["llama", "gemma3"])
@pytest.mark.parametrize("name", sorted(MASS_POLICIES))
def test_a_replayed_prefill_carries_the_same_bias_as_the_direct_path(family, name):
    """The shared-prefill path (one recording, a replay per policy) compresses through the same reducer, so the
    bias, the kept entries and the following logits equal the direct path's bit for bit."""
    from kvpolicy.core.recording import record
    from kvpolicy.core.replay import beyond_window, replay
    from kvpolicy.eval.context import build_policy
    from kvpolicy.testing import CharTokenizer

    model = kvpolicy.attach(build_model(family))
    batch = make_batch(2, 48, pads=[0, 7])
    positions = positions_of(batch["attention_mask"])
    tok = CharTokenizer()

    def forward(cache):
        with torch.inference_mode():
            return model(**batch, position_ids=positions, past_key_values=cache, use_cache=True).logits[:, -1]

    def decode(cache):
        g, mask, out = torch.Generator().manual_seed(3), batch["attention_mask"], []
        for t in range(3):
            mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
            ids = torch.randint(3, 100, (2, 1), generator=g)
            with torch.inference_mode():
                out.append(model(input_ids=ids, attention_mask=mask, position_ids=positions[:, -1:] + t + 1,
                                 past_key_values=cache).logits[:, -1])
        return out

    doc = {**MASS_POLICIES[name], "ratio": 0.75}
    direct = kvpolicy.make_cache(model, build_policy(doc, None), tokenizer=tok)
    forward(direct)
    policy = build_policy(doc, None)
    with torch.inference_mode():
        recording = record(model, forward, beyond_window(policy, model, 48))  # a sliding layer keeps its whole prompt
        replayed = replay(model, policy, recording, whole_model=False, tokenizer=tok)
    merged = 0
    for a, b in zip(direct.policy_layers, replayed.policy_layers):
        assert torch.equal(a.valid, b.valid) and torch.equal(a.positions, b.positions)
        assert torch.equal(a.logit_bias, b.logit_bias)
        merged += int((a.logit_bias > 0).sum())
    assert merged > 0
    for x, y in zip(decode(direct), decode(replayed)):
        assert torch.equal(x, y)
