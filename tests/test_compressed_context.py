"""Context once, many questions (``kvpolicy.compress_context``, issue 16).

Checked against the evaluation protocol run separately for every context + question (``run_exact``: the same prompt
prefilled in two chunks from scratch): identical generated ids and bit-identical log-probabilities at every step, on a
tiny GQA model, a left-padded batch of three contexts, with a policy that compresses at prefill and while decoding.
Questions asked in turn do not leak into each other, and the compressed cache is left as it was.
"""

from __future__ import annotations

import pytest
import torch

import kvpolicy
from kvpolicy.config import load_policy
from kvpolicy.core.budget import Budget
from kvpolicy.eval.compressed import chat_split
from kvpolicy.eval.context import make_context
from kvpolicy.eval.protocol import run_exact
from kvpolicy.eval.tasks import Sample, chat_prompt
from kvpolicy.testing import VOCAB, build_model, first_last_policy, keep_all_policy

MAX_NEW = 6


class _Tok:
    """Enough of a tokenizer for id prompts: eos/pad ids and a decode that names the ids."""

    eos_token_id, pad_token_id, bos_token_id, chat_template = 2, 0, None, None

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def _ids(n: int, g: torch.Generator) -> list[int]:
    return torch.randint(3, VOCAB - 3, (n,), generator=g).tolist()


def _contexts(lengths, seed=11):
    g = torch.Generator().manual_seed(seed)
    return [_ids(n, g) for n in lengths]


def _questions(lengths, seed):
    g = torch.Generator().manual_seed(seed)
    return [_ids(n, g) for n in lengths]


@pytest.fixture(scope="module")
def model():
    m = build_model("qwen2")  # 4 query heads over 2 kv heads
    kvpolicy.attach(m)
    return m


def _protocol(model, policy, contexts, questions):
    """The harness on the whole prompts, from scratch: contexts compressed, each question appended (run_exact)."""
    samples = [
        Sample(id=f"s{r}", prompt_ids=c + q, question_tokens=len(q), generate=True, max_new_tokens=MAX_NEW)
        for r, (c, q) in enumerate(zip(contexts, questions))
    ]
    return run_exact(make_context(model, _Tok(), kl_topk=0), samples, policy, [None] * len(samples))


POLICIES = {
    "full": lambda: None,
    "ratio0": keep_all_policy,
    "first_last_0.5_decode": lambda: first_last_policy(Budget(ratio=0.5), decode=True),
    "first_last_6_tokens": lambda: first_last_policy(Budget(tokens=6), decode=True),
    "snapkv_0.5": lambda: load_policy({"preset": "snapkv", "ratio": 0.5}),  # attention of the context's last tokens
    "h2o_0.5": lambda: load_policy({"preset": "h2o", "ratio": 0.5}),  # accumulated attention, a decode rule
}


@pytest.mark.parametrize("name", sorted(POLICIES))
@pytest.mark.parametrize("context_lengths", [(22, 15, 18), (16, 16, 16)])  # left-padded, and no context padding
def test_every_question_equals_a_separate_protocol_run(model, name, context_lengths):
    policy = POLICIES[name]()
    contexts = _contexts(context_lengths)
    compressed = kvpolicy.compress_context(model, _Tok(), policy, contexts)
    for seed, q_lengths in ((1, (5, 3, 7)), (2, (4, 4, 4)), (3, (1, 9, 2))):
        questions = _questions(q_lengths, seed)
        got = compressed.generate(questions, max_new_tokens=MAX_NEW, scores=True)
        want = _protocol(model, policy, contexts, questions)
        for a, w, q in zip(got, want, questions):
            assert a.question_ids == q
            assert a.ids == w.generation and len(a.ids) > 0
            assert len(a.logprobs) == len(w.logp_steps) == len(a.ids)
            assert all(torch.equal(x, y) for x, y in zip(a.logprobs, w.logp_steps)), (name, seed)


def test_ratio_zero_answers_like_the_full_cache(model):
    contexts, questions = _contexts((20, 13)), _questions((4, 6), 5)
    full = kvpolicy.compress_context(model, _Tok(), None, contexts).generate(questions, scores=True, max_new_tokens=5)
    zero = kvpolicy.compress_context(model, _Tok(), keep_all_policy(), contexts)
    for a, b in zip(full, zero.generate(questions, scores=True, max_new_tokens=5)):
        assert a.ids == b.ids and all(torch.equal(x, y) for x, y in zip(a.logprobs, b.logprobs))


def _held(cache) -> list[list[list[int]]]:
    return [[layer.kept_positions(r) for r in range(layer.held().shape[0])] for layer in cache.policy_layers]


def test_questions_do_not_leak_into_each_other(model):
    policy = first_last_policy(Budget(ratio=0.5), decode=True)
    contexts = _contexts((21, 12))
    compressed = kvpolicy.compress_context(model, _Tok(), policy, contexts)
    before = _held(compressed.cache())
    q1, q2 = _questions((5, 2), 7), _questions((3, 8), 8)
    first = compressed.generate(q1, scores=True, max_new_tokens=MAX_NEW)
    second = compressed.generate(q2, scores=True, max_new_tokens=MAX_NEW)
    again = compressed.generate(q1, scores=True, max_new_tokens=MAX_NEW)
    for a, b in zip(first, again):
        assert a.ids == b.ids and all(torch.equal(x, y) for x, y in zip(a.logprobs, b.logprobs))
    alone = kvpolicy.compress_context(model, _Tok(), policy, contexts).generate(q2, scores=True, max_new_tokens=6)
    for a, b in zip(second, alone):  # asked after q1 or on its own: the same answer
        assert a.ids == b.ids and all(torch.equal(x, y) for x, y in zip(a.logprobs, b.logprobs))
    assert _held(compressed.cache()) == before  # answering wrote nothing into the compressed cache
    assert [len(h) for h in before[0]] == [-(-21 // 2), -(-12 // 2)]  # and the prefill did compress the contexts


def test_one_context_one_question_and_broadcast(model):
    policy = first_last_policy(Budget(ratio=0.5), decode=True)
    contexts = _contexts((18, 18))
    question = _questions((4,), 9)[0]
    single = kvpolicy.compress_context(model, _Tok(), policy, contexts[0])
    text = single.answer(question, max_new_tokens=MAX_NEW)
    (want,) = _protocol(model, policy, contexts[:1], [question])
    assert isinstance(text, str) and text == " ".join(str(i) for i in want.generation if i != _Tok.eos_token_id)
    batch = kvpolicy.compress_context(model, _Tok(), policy, contexts)
    texts = batch.answer(question, max_new_tokens=MAX_NEW)  # one question for every context
    assert isinstance(texts, list) and texts[0] == text and len(texts) == 2


@pytest.mark.parametrize(
    ("context", "question", "message"),
    [
        ([[5, 6, 7], [8, 9]], [[4]], "1 questions for 2 contexts"),
        ([[5, 6, 7]], [[]], "question"),
        ([[5, 6, 7], "text"], [4], "all texts or all token ids"),
        ("text", [4], "needs a tokenizer"),
        ([[]], [4], "context: empty"),
    ],
)
def test_errors_name_the_argument(model, context, question, message):
    with pytest.raises(ValueError, match=message):
        tok = None if message == "needs a tokenizer" else _Tok()
        kvpolicy.compress_context(model, tok, None, context).generate(question)


# ------------------------------------------------------------------------------------------ text prompts
@pytest.fixture(scope="module")
def smol_tok():
    from transformers import AutoTokenizer

    from kvpolicy.models import ALIASES, ensure_cached

    return AutoTokenizer.from_pretrained(str(ensure_cached(ALIASES["smollm2-135m"])))


@pytest.mark.parametrize("chat", [None, False])
def test_text_prompt_is_the_one_turn_prompt_cut_at_the_question(smol_tok, chat):
    """The context's ids, then the question with the end of the turn, spell exactly the one-prompt text of
    ``chat_prompt(context + question)``; the context's ids are a prefix of it where the boundary is clean (a context
    ending in whitespace that the one prompt would merge with the question's first word is tokenized alone, as a real
    prefix cache tokenizes it)."""
    context = "The harbor lantern is kept by Mara. The canal gate opens at nine."
    question = "\nWho keeps the harbor lantern?"
    head, tail = chat_split(smol_tok, context, chat)
    one = chat_prompt(smol_tok, context + question, chat=chat)
    q_ids = smol_tok(question + tail, add_special_tokens=False)["input_ids"]
    assert smol_tok.decode(head + q_ids) == smol_tok.decode(one)
    assert one[: len(head)] == head and one[len(head) :] == q_ids
    assert chat_split(smol_tok, context, chat)[0] == head  # the context's ids do not depend on any question
