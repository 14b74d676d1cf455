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


# ------------------------------------------------------------------------------------------ the evaluation protocol
from kvpolicy.eval.context import make_context  # noqa: E402
from kvpolicy.eval.protocol import batch_inputs, prefill, run_exact  # noqa: E402
from kvpolicy.eval.tasks import Sample  # noqa: E402
from kvpolicy.testing import keep_all_policy  # noqa: E402


class _Tok:
    eos_token_id, pad_token_id, bos_token_id, chat_template = 2, 0, None, None

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def _samples(split: bool) -> list[Sample]:
    """Three prompts of different lengths (left padding), each a context followed by a question."""
    g = torch.Generator().manual_seed(5)
    out = []
    for i, (c, q) in enumerate([(22, 7), (15, 3), (18, 5)]):
        ids = torch.randint(3, VOCAB - 3, (c + q,), generator=g).tolist()
        target = torch.randint(3, VOCAB - 3, (4,), generator=g).tolist()
        out.append(Sample(id=f"s{i}", prompt_ids=ids, target_ids=target, generate=True, max_new_tokens=5,
                          question_tokens=q if split else 0))
    return out


@pytest.fixture(scope="module")
def tiny_ctx():
    model = build_model("qwen2")  # GQA: 4 query heads over 2 kv heads
    kvpolicy.attach(model)
    return make_context(model, _Tok(), kl_topk=0)


@pytest.mark.parametrize("split", [False, True])
def test_ratio_zero_equals_the_full_cache_in_both_modes(tiny_ctx, split):
    samples = _samples(split)
    targets = [s.target_ids for s in samples]
    full = run_exact(tiny_ctx, samples, None, targets)
    for policy in (keep_all_policy(), first_last_policy(Budget(ratio=0.0))):
        got = run_exact(tiny_ctx, samples, policy, targets)
        for a, b in zip(full, got):
            assert a.generation == b.generation
            assert all(torch.equal(x, y) for x, y in zip(a.logp_steps, b.logp_steps)), policy.name


def test_two_chunk_full_cache_is_the_one_prompt_computation(tiny_ctx):
    """Splitting the prefill changes nothing but rounding for the full cache: both modes see the same prompt."""
    one, two = _samples(False), _samples(True)
    targets = [s.target_ids for s in one]
    a_rows, b_rows = run_exact(tiny_ctx, one, None, targets), run_exact(tiny_ctx, two, None, targets)
    for a, b in zip(a_rows, b_rows):
        assert a.generation == b.generation
        for x, y in zip(a.logp_steps, b.logp_steps):
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("split", [False, True])
def test_question_entries_are_never_compressed_at_prefill(tiny_ctx, split):
    samples = _samples(split)
    cache = kvpolicy.make_cache(tiny_ctx.model, first_last_policy(Budget(ratio=0.5)))
    inputs = batch_inputs(tiny_ctx, samples)
    prefill(tiny_ctx, inputs, cache)
    width = inputs.mask.shape[1]
    for r, s in enumerate(samples):
        q = 5 if not split else s.question_tokens  # the last tokens of the prompt
        n = len(s.prompt_ids)
        last = list(range(width - q, width))
        for layer in cache.policy_layers:
            held = layer.kept_positions(r)
            if split:  # query-agnostic: the context was compressed alone, the question is held whole
                assert held[-q:] == last and len(held) == -(-(n - q) // 2) + q
            else:  # query-aware: one prompt, compressed together (today's path)
                assert len(held) == -(-n // 2)


# ------------------------------------------------------------------------------------------ the ruler task's option
@pytest.fixture(scope="module")
def smol_tok():
    from transformers import AutoTokenizer

    from kvpolicy.models import ALIASES, ensure_cached

    return AutoTokenizer.from_pretrained(str(ensure_cached(ALIASES["smollm2-135m"])))


@pytest.mark.parametrize("chat", [None, False])
def test_ruler_question_chunk_is_the_question(smol_tok, chat):
    from kvpolicy.eval.tasks import get_task

    task = get_task("ruler")
    opts = {"context_tokens": 1024, "tasks": "niah_single_1,vt,cwe", "chat": chat}
    agnostic = task.load(smol_tok, 3, 0, task.options(opts))
    aware = task.load(smol_tok, 3, 0, task.options({**opts, "query_aware": True}))
    for a, b in zip(agnostic, aware):
        assert a.prompt_ids == b.prompt_ids and b.question_tokens == 0  # query-aware: one prompt, as before
        q = a.question_tokens
        assert 0 < q < len(a.prompt_ids) // 2
        head, tail = smol_tok.decode(a.prompt_ids[:-q]), smol_tok.decode(a.prompt_ids[-q:])
        assert a.context.rstrip() in head and a.question.strip()[5:] in tail  # the split sits at the question
        assert (head + tail).rfind(a.question.strip()) >= len(head) - 3  # the asked question starts the tail
        assert a.content_hash() != b.content_hash()  # references of the two modes are not shared
