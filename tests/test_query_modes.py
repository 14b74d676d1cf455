"""Query-agnostic vs query-aware evaluation (issue 16).

Engine: a chunk appended to a prefilled, compressed cache (``PolicyCache.appending``) must equal a naive reference —
a ``DynamicCache`` built by hand from the entries the prefill kept, then the chunk run with explicit position ids —
store every chunk entry uncompressed, and leave the decode budget counted from the cache as it stands after the
chunk. Protocol: ratio 0 equals the full cache in both modes; the question's entries are never compressed at prefill;
query-aware equals today's single-prompt path.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import kvpolicy
from kvpolicy.core.budget import Budget
from kvpolicy.testing import PAD, VOCAB, build_model, first_last_policy

CTX = [20, 14]  # real context tokens per row (left-padded to 20)
QUESTION = [6, 4]  # real question tokens per row (left-padded to 6)


def _chunks(seed: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded context and question chunks of two rows (each chunk padded on its own)."""
    g = torch.Generator().manual_seed(seed)
    wc, wq = max(CTX), max(QUESTION)
    ids_c = torch.full((2, wc), PAD)
    ids_q = torch.full((2, wq), PAD)
    m_c = torch.zeros(2, wc, dtype=torch.long)
    m_q = torch.zeros(2, wq, dtype=torch.long)
    for r in range(2):
        ids_c[r, wc - CTX[r] :] = torch.randint(3, VOCAB - 2, (CTX[r],), generator=g)
        ids_q[r, wq - QUESTION[r] :] = torch.randint(3, VOCAB - 2, (QUESTION[r],), generator=g)
        m_c[r, wc - CTX[r] :] = 1
        m_q[r, wq - QUESTION[r] :] = 1
    return ids_c, m_c, ids_q, m_q


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp(min=0)


def _prefill_and_append(model, cache):
    """The context through ``cache``, then the question appended uncompressed; returns the chunk's logits."""
    ids_c, m_c, ids_q, m_q = _chunks()
    full = torch.cat([m_c, m_q], 1)
    with torch.inference_mode():
        model(input_ids=ids_c, attention_mask=m_c, position_ids=_positions(m_c), past_key_values=cache, use_cache=True)
        with cache.appending():
            out = model(
                input_ids=ids_q,
                attention_mask=full,
                position_ids=_positions(full)[:, -ids_q.shape[1] :],
                past_key_values=cache,
                use_cache=True,
            )
    return out.logits, ids_q


def _kept_reference(model, cache, row: int) -> DynamicCache:
    """A ``DynamicCache`` of one row holding exactly the entries the policy cache kept (in position order)."""
    ref = DynamicCache(config=model.config)
    for layer in cache.policy_layers:
        keys, values = [], []
        for head in range(layer.held().shape[1]):
            valid, pos, _ = layer.slots(head)
            k, v = layer.head_kv(head)
            order = pos[row][valid[row]].argsort()
            keys.append(k[row][valid[row]][order])
            values.append(v[row][valid[row]][order])
        ref.update(torch.stack(keys)[None], torch.stack(values)[None], layer.layer_idx)
    return ref


def test_appended_chunk_matches_naive_reference():
    model = build_model("llama")
    kvpolicy.attach(model)
    policy = first_last_policy(Budget(ratio=0.5), decode=True)
    cache = kvpolicy.make_cache(model, policy)
    ids_c, m_c, ids_q, m_q = _chunks()
    with torch.inference_mode():
        model(input_ids=ids_c, attention_mask=m_c, position_ids=_positions(m_c), past_key_values=cache, use_cache=True)
    kept = [cache.policy_layers[0].kept_positions(r) for r in range(2)]
    refs = [_kept_reference(model, cache, r) for r in range(2)]
    logits, _ = _prefill_and_append(model, kvpolicy.make_cache(model, policy))
    for r in range(2):
        q = QUESTION[r]
        with torch.inference_mode():
            want = model(
                input_ids=ids_q[r : r + 1, -q:],
                position_ids=torch.arange(CTX[r], CTX[r] + q)[None],
                past_key_values=refs[r],
                use_cache=True,
            ).logits[0]
        torch.testing.assert_close(logits[r, -q:], want, rtol=1e-5, atol=1e-5)
        assert len(kept[r]) == -(-CTX[r] // 2)  # ceil(n * (1 - 0.5)): the prefill compressed the context


def test_appended_chunk_is_held_whole_and_prefill_does_not_rerun():
    model = build_model("llama")
    kvpolicy.attach(model)
    cache = kvpolicy.make_cache(model, first_last_policy(Budget(ratio=0.5), decode=True))
    _prefill_and_append(model, cache)
    pad_c = max(CTX)
    for layer in cache.policy_layers:
        for r in range(2):
            held = layer.kept_positions(r)
            question_cols = list(range(pad_c + max(QUESTION) - QUESTION[r], pad_c + max(QUESTION)))
            assert held[-QUESTION[r] :] == question_cols  # every question entry, none compressed
            assert len(held) == -(-CTX[r] // 2) + QUESTION[r]  # the context's budget was not applied again
        assert layer.appended.tolist() == QUESTION
        assert layer.n_tokens.tolist() == [c + q for c, q in zip(CTX, QUESTION)]


def test_append_before_prefill_is_an_error():
    model = build_model("llama")
    kvpolicy.attach(model)
    cache = kvpolicy.make_cache(model, first_last_policy(Budget(ratio=0.5)))
    with cache.appending(), pytest.raises(RuntimeError, match="prefill forward first"):
        model(input_ids=torch.tensor([[5, 6, 7]]), past_key_values=cache, use_cache=True)


def _decode_held(model, cache, steps: int, ids_last: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
    """Greedy-free decode: feed a fixed token ``steps`` times; layer 0's held entries per row after each step."""
    held = []
    pos = mask.sum(-1)
    with torch.inference_mode():
        for t in range(steps):
            mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
            model(input_ids=ids_last, attention_mask=mask, position_ids=(pos + t)[:, None], past_key_values=cache)
            held.append(cache.policy_layers[0].held()[:, 0].tolist())
    return held


@pytest.mark.parametrize("budget", [Budget(ratio=0.5), Budget(ratio=0.75), Budget(tokens=6)])
def test_decode_budget_counts_from_the_cache_after_the_question(budget):
    """The documented rule: the question's entries are held in full and the decode rule runs on the tokens generated
    after them exactly as it would right after a prefill of the context alone (so the first generated token evicts
    nothing the rule would not evict without a question)."""
    model = build_model("llama")
    kvpolicy.attach(model)
    policy = first_last_policy(budget, decode=True)
    ids_c, m_c, ids_q, m_q = _chunks()
    feed = torch.tensor([[7], [9]])

    with_question = kvpolicy.make_cache(model, policy)
    _prefill_and_append(model, with_question)
    got = _decode_held(model, with_question, 12, feed, torch.cat([m_c, m_q], 1))

    context_only = kvpolicy.make_cache(model, policy)
    with torch.inference_mode():
        model(input_ids=ids_c, attention_mask=m_c, position_ids=_positions(m_c), past_key_values=context_only)
    want = _decode_held(model, context_only, 12, feed, m_c)
    assert got == [[h + q for h, q in zip(step, QUESTION)] for step in want]
