"""The engine against the plain cache and against a naive, hand-built compressed cache."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import kvpolicy
from kvpolicy import Budget
from kvpolicy.testing import (
    LLAVA_IMAGE_TOKENS,
    PAD,
    PlainEvict,
    build_model,
    first_last_policy,
    keep_all_policy,
    make_batch,
)

GEN = dict(do_sample=False, pad_token_id=PAD)


def _generate(model, batch, cache=None, n=8):
    kwargs = dict(batch, max_new_tokens=n, min_new_tokens=n, **GEN)
    if cache is not None:
        kwargs["past_key_values"] = cache
    return model.generate(**kwargs)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "llava"])
@pytest.mark.parametrize("pads", [[0], [0, 3, 6]])
def test_ratio_zero_matches_dynamic_cache(family, attn, pads):
    model = build_model(family, attn=attn)
    batch = make_batch(len(pads), 28 if family == "llava" else 16, pads, image=family == "llava")
    expected = _generate(model, batch)
    kvpolicy.attach(model, backend=attn)
    for policy in (keep_all_policy(), first_last_policy(Budget(ratio=0.0))):
        cache = kvpolicy.make_cache(model, policy)
        got = _generate(model, batch, cache)
        assert torch.equal(got, expected), policy.name
        # nothing dropped: every real token is still held
        n_real = batch["attention_mask"].sum(-1) + 8 - 1
        assert cache.policy_layers[0].held()[:, 0].tolist() == n_real.tolist()


@pytest.mark.parametrize("family", ["llama", "llava"])
def test_budget_that_keeps_everything_is_identical(family):
    model = build_model(family)
    batch = make_batch(3, 28 if family == "llava" else 16, [0, 3, 6], image=family == "llava")
    expected = _generate(model, batch)
    kvpolicy.attach(model)
    cache = kvpolicy.make_cache(model, first_last_policy(Budget(tokens=64)))
    assert torch.equal(_generate(model, batch, cache), expected)


def test_real_budget_holds_exact_lengths_through_fixed_decode():
    model = build_model("llama")
    kvpolicy.attach(model)
    batch = make_batch(1, 24)
    cache = kvpolicy.make_cache(model, first_last_policy(Budget(tokens=10)))
    lengths = []

    class Record:
        def __call__(self, input_ids, scores):
            lengths.append([(layer.length, layer.keys.shape[2], int(layer.held().max())) for layer in cache.policy_layers])
            return scores

    from transformers import LogitsProcessorList

    _generate(model, batch, cache, n=12) if False else model.generate(
        **batch, max_new_tokens=12, min_new_tokens=12, logits_processor=LogitsProcessorList([Record()]), **GEN
    , past_key_values=cache)
    assert len(lengths) == 12
    for step in lengths:
        assert step == [(10, 10, 10)] * len(cache.policy_layers)
    assert cache.nbytes() == len(cache.policy_layers) * 2 * (1 * 2 * 10 * 16 * 4)


# ---------------------------------------------------------------------------------------------------------------
# A naive reference: the compressed cache built by hand from a full-cache run of each row alone, with explicit
# logical position_ids, and the keep-first-and-last rule re-implemented with Python sets.


def _layer_kv(cache: DynamicCache, layer: int):
    return cache.layers[layer].keys, cache.layers[layer].values


def naive_first_last(model, ids: list[int], tokens: list[int], budget: int, first: int, compressed: bool = False):
    """Logits of each fed token, and the kept positions per step, for one unpadded row under first+recent.

    ``compressed``: the new token's position id is the number of entries held (transformers 4.31 + the authors' code)."""
    n = len(ids)
    full = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=torch.tensor([ids]), past_key_values=full, use_cache=True)
    layers = len(full.layers)
    store = [{p: (_layer_kv(full, i)[0][:, :, p], _layer_kv(full, i)[1][:, :, p]) for p in range(n)} for i in range(layers)]
    kept = set(range(first)) | set(range(max(first, n - (budget - first)), n))
    logits, kept_log = [], []
    for s, tok in enumerate(tokens):
        pos = n + s
        rope_pos = len(kept) if compressed else pos
        if len(kept) + 1 > budget:
            kept.remove(min(kept - set(range(first))))
        order = sorted(kept)
        cache = DynamicCache(config=model.config)
        for i in range(layers):
            k = torch.stack([store[i][p][0] for p in order], dim=2)
            v = torch.stack([store[i][p][1] for p in order], dim=2)
            cache.update(k, v, i)
        with torch.no_grad():
            out = model(
                input_ids=torch.tensor([[tok]]),
                position_ids=torch.tensor([[rope_pos]]),
                past_key_values=cache,
                use_cache=True,
            )
        for i in range(layers):
            k, v = _layer_kv(cache, i)
            store[i][pos] = (k[:, :, -1], v[:, :, -1])
        kept.add(pos)
        logits.append(out.logits[0, -1])
        kept_log.append(sorted(kept))
    return torch.stack(logits), kept_log


def _run_policy(model, batch, policy, steps):
    cache = kvpolicy.make_cache(model, policy)
    kept = []
    from transformers import LogitsProcessorList

    class Record:
        def __call__(self, input_ids, scores):
            kept.append([layer_kept(cache, r) for r in range(input_ids.shape[0])])
            return scores

    out = model.generate(
        **batch,
        past_key_values=cache,
        max_new_tokens=steps,
        min_new_tokens=steps,
        output_logits=True,
        return_dict_in_generate=True,
        logits_processor=LogitsProcessorList([Record()]),
        **GEN,
    )
    return out, cache, kept


def layer_kept(cache, row):
    return [layer.kept_positions(row, h) for layer in cache.policy_layers for h in range(layer.held().shape[1])]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("pads", [[0], [0, 4, 7]])
def test_decode_logits_match_naive_compressed_cache(pads, attn):
    model = build_model("llama", attn=attn)
    batch = make_batch(len(pads), 20, pads, seed=3)
    kvpolicy.attach(model, backend=attn)
    budget, first, steps = 9, 2, 10
    out, cache, kept = _run_policy(model, batch, first_last_policy(Budget(tokens=budget), first), steps)
    generated = out.sequences[:, 20:]
    for r, p in enumerate(pads):
        ids = batch["input_ids"][r, p:].tolist()
        toks = generated[r].tolist()[:-1]
        ref_logits, ref_kept = naive_first_last(model, ids, toks, budget, first)
        got = torch.stack([out.logits[s][r] for s in range(1, steps)])
        torch.testing.assert_close(got, ref_logits, atol=2e-5, rtol=1e-4)
        # the entries held after each step, mapped from padded-batch columns to row positions, are the reference's
        for s in range(1, steps):
            for layer_positions in kept[s][r]:
                assert [c - p for c in layer_positions] == ref_kept[s - 1]


@pytest.mark.parametrize("family", ["llama", "llava"])
def test_padded_rows_match_rows_run_alone_and_never_keep_pads(family):
    model = build_model(family)
    length = 28 if family == "llava" else 20
    pads = [0, 3, 6]
    batch = make_batch(3, length, pads, seed=5, image=family == "llava")
    kvpolicy.attach(model)
    policy = lambda: first_last_policy(Budget(ratio=0.5), first=2)  # noqa: E731
    out, cache, _ = _run_policy(model, batch, policy(), 6)
    for r, p in enumerate(pads):
        # pads are never kept
        for positions in layer_kept(cache, r):
            assert min(positions) >= p
        alone = {k: v[r : r + 1, p:] for k, v in batch.items() if k != "pixel_values"}
        if family == "llava":
            alone["pixel_values"] = batch["pixel_values"][r : r + 1]
        out1, cache1, _ = _run_policy(model, alone, policy(), 6)
        assert out.sequences[r, length:].tolist() == out1.sequences[0, length - p :].tolist()
        assert [[c - p for c in lp] for lp in layer_kept(cache, r)] == layer_kept(cache1, 0)
        for s in range(6):
            torch.testing.assert_close(out.logits[s][r], out1.logits[s][0], atol=2e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# Attention statistics


def naive_attention_received(query, key, valid_keys, pads, window):
    """Loops: softmax of each real query over the real keys at or before it, summed, mean over each group's heads."""
    b, hq, q, d = query.shape
    h = key.shape[1]
    g = hq // h
    out = torch.zeros(b, h, q)
    for r in range(b):
        for head in range(hq):
            kv = head // g
            for i in range(max(0, q - window) if window else 0, q):
                if i < pads[r]:
                    continue
                cols = [j for j in range(i + 1) if valid_keys[r, j]]
                logits = torch.stack([query[r, head, i] @ key[r, kv, j] for j in cols]) * d**-0.5
                probs = torch.softmax(logits, 0)
                for j, pr in zip(cols, probs):
                    out[r, kv, j] += pr / g
    return out


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("chunk", [1, 7, 1 << 20])
@pytest.mark.parametrize("prefix", [None, 0])
def test_attention_received_matches_naive(window, chunk, prefix):
    from kvpolicy.core.kernels import attention_received

    torch.manual_seed(0)
    b, hq, h, q, d = 3, 4, 2, 11, 8
    pads = [0, 2, 5]
    query, key = torch.randn(b, hq, q, d), torch.randn(b, h, q, d)
    valid = torch.ones(b, q, dtype=torch.bool)
    for r, p in enumerate(pads):
        valid[r, :p] = False
    got = attention_received(
        query,
        key,
        valid[:, None].expand(b, h, q),
        torch.arange(q).expand(b, h, q),
        torch.arange(q),
        valid,
        d**-0.5,
        window,
        chunk_elements=chunk,
        first_slot_col=prefix,
        min_rows=1,
    )
    expected = naive_attention_received(query, key, valid, pads, window)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert got[valid[:, None].expand(b, h, q).logical_not()].abs().max() == 0  # pads receive nothing


@pytest.mark.parametrize("window", [None, 1, 4, 50])
@pytest.mark.parametrize("chunk", [1, 13, 200, 1 << 20])
@pytest.mark.parametrize("pads", [[0, 0], [3, 0], [0, 9]])
def test_causal_prefix_statistics_equal_the_general_masked_ones(window, chunk, pads):
    """The fast path for uncompressed layers (keys after a chunk's last query skipped, diagonal-block mask) against
    the general per-slot masked path, for a query block that follows earlier columns (a second prefill chunk) and
    for left padding that covers keys and queries."""
    from kvpolicy.core.kernels import attention_received

    torch.manual_seed(1)
    b, hq, h, p, q, d, first = 2, 6, 2, 23, 9, 8, 5  # slots hold columns 5..27; queries are the last 9 columns
    query, key = torch.randn(b, hq, q, d), torch.randn(b, h, p, d)
    valid = torch.ones(b, p, dtype=torch.bool)
    for r, n_pad in enumerate(pads):
        valid[r, :n_pad] = False
    key_pos = (torch.arange(p) + first).expand(b, h, p)
    cols = torch.arange(first + p - q, first + p)
    query_valid = valid[:, p - q :]
    args = (query, key, valid[:, None].expand(b, h, p), key_pos, cols, query_valid, d**-0.5, window)
    general = attention_received(*args, chunk_elements=chunk)
    fast = attention_received(*args, chunk_elements=chunk, first_slot_col=first, min_rows=1)
    torch.testing.assert_close(fast, general, atol=1e-6, rtol=1e-5)
    assert general.sum() > 0


@pytest.mark.parametrize("chunk", [1, 13, 1 << 20])
@pytest.mark.parametrize("pads", [[0, 0], [4, 0], [0, 11]])
@pytest.mark.parametrize("first", [0, 3])
def test_one_pass_outputs_and_statistics_equal_sdpa_and_the_naive_loop(chunk, pads, first):
    """The fused prefill path: outputs equal SDPA under transformers-style causal + padding masking (real query
    rows), statistics equal the naive loop, for GQA, left padding (keys and queries) and a query block that follows
    earlier columns."""
    from kvpolicy.core.kernels import attention_received, attention_with_received

    torch.manual_seed(2)
    b, hq, h, p, q, d = 2, 6, 2, 17, 12, 8  # the queries are the last 12 of 17 slots
    query, key, value = torch.randn(b, hq, q, d), torch.randn(b, h, p, d), torch.randn(b, h, p, d)
    valid = torch.ones(b, p, dtype=torch.bool)
    for r, n_pad in enumerate(pads):
        valid[r, :n_pad] = False
    qvalid = valid[:, p - q :]
    out, received = attention_with_received(
        query, key, value, valid[:, None].expand(b, h, p), qvalid, d**-0.5, first, first + p - q, chunk, min_rows=1
    )
    assert out.shape == (b, q, hq, d)
    allowed = valid[:, None, None, :] & (torch.arange(p)[None, None, None, :] <= torch.arange(p - q, p)[:, None])
    ref = torch.nn.functional.scaled_dot_product_attention(
        query, key.repeat_interleave(hq // h, 1), value.repeat_interleave(hq // h, 1), attn_mask=allowed
    ).transpose(1, 2)
    real = qvalid[:, :, None, None].expand_as(out)
    torch.testing.assert_close(out[real], ref[real], atol=1e-6, rtol=1e-5)
    assert not out[~real].any()  # padding queries: zero rows
    general = attention_received(
        query, key, valid[:, None].expand(b, h, p), (torch.arange(p) + first).expand(b, h, p),
        torch.arange(first + p - q, first + p), qvalid, d**-0.5, None, chunk_elements=chunk,
    )
    torch.testing.assert_close(received, general, atol=1e-6, rtol=1e-5)  # general path: checked against the loop


@pytest.mark.parametrize("q", [1, 3])
@pytest.mark.parametrize("holes", [False, True])
def test_one_block_decode_outputs_and_statistics_equal_the_separate_paths(q, holes):
    """Decode steps on a compressed layer: slots out of column order, some invalid, a padding query row. Outputs
    equal grouped_attention's, statistics equal attention_received's (itself checked against the naive loop)."""
    from kvpolicy.core.kernels import attention_received, grouped_attention, masked_attention_with_received

    torch.manual_seed(3)
    b, hq, h, p, d = 2, 6, 2, 15, 8
    query, key, value = torch.randn(b, hq, q, d), torch.randn(b, h, p, d), torch.randn(b, h, p, d)
    key_pos = torch.stack([torch.stack([torch.randperm(p) for _ in range(h)]) for _ in range(b)]) + 20
    valid = torch.ones(b, h, p, dtype=torch.bool)
    if holes:
        valid &= torch.rand(b, h, p) > 0.3
    valid[:, :, key_pos[0, 0].argmax()] = True  # the newest column is always held
    cols = torch.arange(20 + p - q, 20 + p)
    query_valid = torch.ones(b, q, dtype=torch.bool)
    if q > 1:
        query_valid[1, 0] = False
    mask = valid[:, :, None, :] & (key_pos[:, :, None, :] <= cols[:, None])
    out, received = masked_attention_with_received(query, key, value, mask, query_valid, d**-0.5)
    ref_out = grouped_attention(query, key, value, mask, d**-0.5, eager=False)
    real = query_valid[:, :, None, None].expand_as(out) & mask.any(-1).all(1)[:, :, None, None].expand_as(out)
    torch.testing.assert_close(out[real], ref_out[real], atol=1e-6, rtol=1e-5)
    ref = attention_received(query, key, valid, key_pos, cols, query_valid, d**-0.5, None)
    torch.testing.assert_close(received, ref, atol=1e-6, rtol=1e-5)


class Received:
    """An attention-statistics scorer for the engine tests (H2O-like, heads averaged), with 2 sinks."""

    def __init__(self, window=None):
        self.needs = frozenset({kvpolicy.AttentionStat(window)})
        self.window = window

    def score(self, view):
        s = view.attention[self.window].mean(1, keepdim=True)
        return torch.where(view.rank()[:, :1] < 2, float("inf"), s)


def test_attention_scored_prefill_matches_gathered_reference_per_row():
    """Rows of a left-padded batch keep different positions per layer; each row's following decode logits equal a
    cache built by hand from that row's full-cache prefill with the same kept positions."""
    model = build_model("qwen2")
    kvpolicy.attach(model)
    pads = [0, 4, 7]
    batch = make_batch(3, 22, pads, seed=9)
    policy = kvpolicy.CachePolicy(
        reducer=PlainEvict(), budget=Budget(ratio=0.6, decode="off"), encode=Received()
    )
    out, cache, kept = _run_policy(model, batch, policy, 6)
    sets = set()
    for r, p in enumerate(pads):
        ids = batch["input_ids"][r, p:].tolist()
        n = len(ids)
        per_layer = [[c - p for c in layer.kept_positions(r)] for layer in cache.policy_layers]
        prompt_kept = [[x for x in lp if x < n] for lp in per_layer]
        assert all(len(lp) == -(-n * 4 // 10) for lp in prompt_kept)  # ceil(n * (1 - 0.6))
        sets.add(tuple(map(tuple, prompt_kept)))
        full = DynamicCache(config=model.config)
        with torch.no_grad():
            model(input_ids=torch.tensor([ids]), past_key_values=full, use_cache=True)
        ref = DynamicCache(config=model.config)
        for i, lp in enumerate(prompt_kept):
            k, v = _layer_kv(full, i)
            ref.update(k[:, :, lp], v[:, :, lp], i)
        toks = out.sequences[r, 22:].tolist()
        for s in range(5):
            with torch.no_grad():
                o = model(
                    input_ids=torch.tensor([[toks[s]]]),
                    position_ids=torch.tensor([[n + s]]),
                    past_key_values=ref,
                    use_cache=True,
                )
            torch.testing.assert_close(out.logits[s + 1][r], o.logits[0, -1], atol=2e-5, rtol=1e-4)
    assert len(sets) == 3  # the rows really kept different positions


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_runs_without_nan(dtype):
    model = build_model("llama").to(dtype)
    kvpolicy.attach(model)
    batch = make_batch(3, 20, [0, 4, 7], seed=2)
    policy = kvpolicy.CachePolicy(
        reducer=PlainEvict(), budget=Budget(ratio=0.5), encode=Received(), decode=Received()
    )
    policy.decode.drop_scores = policy.decode.score  # attention-needing decode rule: drops after the step's attention
    out, cache, _ = _run_policy(model, batch, policy, 6)
    for logits in out.logits:
        assert torch.isfinite(logits).all()
    for layer in cache.policy_layers:
        assert torch.isfinite(layer.keys).all() and layer.keys.dtype == dtype


def test_unattached_model_and_unsupported_model_errors():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = build_model("llama")
    with pytest.raises(RuntimeError, match="kvpolicy.attach"):
        kvpolicy.make_cache(model, keep_all_policy())
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(kvpolicy.UnsupportedModelError, match="GPT2LMHeadModel"):
        kvpolicy.attach(gpt2)


def test_llava_image_positions_are_typed_in_the_cache():
    model = build_model("llava")
    kvpolicy.attach(model)
    pads = [0, 3]
    batch = make_batch(2, 28, pads, image=True)
    cache = kvpolicy.make_cache(model, keep_all_policy())
    model.generate(**batch, past_key_values=cache, max_new_tokens=3, min_new_tokens=3, **GEN)
    layer = cache.policy_layers[0]
    for r, p in enumerate(pads):
        v = layer.valid[r, 0]
        types = layer.token_types[r, 0][v].tolist()
        assert types.count(kvpolicy.IMAGE) == LLAVA_IMAGE_TOKENS
        assert types[-2:] == [kvpolicy.GENERATED] * 2
        first_image = p + 2
        pos = layer.positions[r, 0][v].tolist()
        assert [t for t, c in zip(types, pos) if first_image <= c < first_image + LLAVA_IMAGE_TOKENS] == [
            kvpolicy.IMAGE
        ] * LLAVA_IMAGE_TOKENS


@pytest.mark.parametrize("pads", [[0], [0, 5]])
def test_compressed_positions_switch_matches_physical_position_ids(pads):
    """The authors'-code quirk: new tokens get position = entries held; reproduced by re-rotating q and k."""
    model = build_model("llama")
    kvpolicy.attach(model)
    batch = make_batch(len(pads), 20, pads, seed=4)
    budget, first, steps = 9, 2, 8
    policy = first_last_policy(Budget(tokens=budget), first)
    policy.compressed_positions = True
    out, _, _ = _run_policy(model, batch, policy, steps)
    plain, _, _ = _run_policy(model, batch, first_last_policy(Budget(tokens=budget), first), steps)
    for r, p in enumerate(pads):
        ids = batch["input_ids"][r, p:].tolist()
        toks = out.sequences[r, 20:].tolist()[:-1]
        ref, _ = naive_first_last(model, ids, toks, budget, first, compressed=True)
        got = torch.stack([out.logits[s][r] for s in range(1, steps)])
        torch.testing.assert_close(got, ref, atol=5e-5, rtol=1e-4)
    # and it really differs from logical positions
    assert not torch.allclose(out.logits[2], plain.logits[2])


def test_lowest_slot_equals_the_head_of_the_full_ranking():
    from kvpolicy.core.selection import lowest_slot, ranked_slots

    g = torch.Generator().manual_seed(0)
    for trial in range(50):
        b, h, p = 3, 2, 17
        valid = torch.rand(b, h, p, generator=g) > 0.3
        valid[..., 0] = True
        positions = torch.stack([torch.randperm(p, generator=g) for _ in range(b * h)]).view(b, h, p)
        scores = torch.randint(0, 4, (b, 1 if trial % 2 else h, p), generator=g).float()  # many ties
        scores[..., 3] = float("inf")
        view = kvpolicy.LayerView(
            layer_idx=0, num_layers=1, stage="decode", keys=torch.zeros(b, h, p, 1), values=torch.zeros(b, h, p, 1),
            valid=valid, positions=positions, seen=p, n_tokens=valid[:, 0].sum(-1), new_tokens=1,
            token_types=torch.zeros(b, h, p, dtype=torch.int8),
        )
        assert torch.equal(lowest_slot(view, scores), ranked_slots(view, -scores)[..., :1])


def test_causal_prefix_blocks_take_min_rows_but_never_exceed_the_block_cap(monkeypatch):
    """Thin blocks are widened to MIN_CHUNK_ROWS rows, but a large batch x heads x keys falls back to the element
    bound: no block beyond MAX_CHUNK_ELEMENTS (unless a single row already is)."""
    from kvpolicy.core import kernels as A

    b, hq, h, n, d = 2, 4, 2, 64, 8
    query, key = torch.randn(b, hq, n, d), torch.randn(b, h, n, d)
    valid, qvalid = torch.ones(b, h, n, dtype=torch.bool), torch.ones(b, n, dtype=torch.bool)
    per_row = b * hq * n

    def sizes(cap: int) -> list[int]:
        monkeypatch.setattr(A, "MAX_CHUNK_ELEMENTS", cap)
        blocks = A.causal_prefix_blocks(query, key, valid, qvalid, 0.3, 0, 0, per_row // 2, 32)
        return [i1 - i0 for i0, i1, _, _ in blocks]

    assert sizes(per_row * 64) == [32, 32]  # widened from the 1 row the element bound allows
    assert set(sizes(per_row * 4)) == {4}  # capped: 4 rows fit under the cap
    assert set(sizes(per_row // 4)) == {1}  # not even one row fits: one row at a time
