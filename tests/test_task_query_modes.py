"""``needle`` and ``jsonl`` in both modes (``query_aware``, issue 16), with SmolLM2's tokenizer.

The split sits at the question (the two chunks concatenate to exactly the one-prompt ids, the tail decodes to the
question); on a tiny random-init GQA model with SmolLM2's vocabulary, a left-padded batch of each task's samples run
through the protocol: ratio 0 is bit-identical to the full cache in both modes, and in the query-agnostic mode every
question entry is held after prefill while the context alone was compressed.
"""

from __future__ import annotations

import json

import pytest
import torch

import kvpolicy
from kvpolicy.core.budget import Budget
from kvpolicy.eval.context import make_context
from kvpolicy.eval.protocol import batch_inputs, prefill, run_exact
from kvpolicy.eval.tasks import TaskError, get_task
from kvpolicy.testing import first_last_policy, keep_all_policy

QUESTIONS = [  # context, question, answer
    ("The lantern of the north harbor is kept by Mara Quint, who lights it at dusk. " * 6, "Who keeps the lantern?",
     "Mara Quint"),
    ("Gate seven opens at nine and closes at four. " * 3, "\nWhen does gate seven close?", "At four o'clock."),
    ("The orchard has eleven walnut trees and three cedars. " * 9, " How many cedars are there?", "Three cedars."),
]


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from kvpolicy.models import ALIASES, ensure_cached

    return AutoTokenizer.from_pretrained(str(ensure_cached(ALIASES["smollm2-135m"])))


@pytest.fixture(scope="module")
def qa_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("jsonl") / "qa.jsonl"
    lines = [{"context": c, "question": q, "answer": a} for c, q, a in QUESTIONS] + [{"prompt": "Say hello."}]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def _load(tok, task: str, qa_file, **opts):
    t = get_task(task)
    if task == "jsonl":
        return t.load(tok, 3, 0, t.options({"path": str(qa_file), "shuffle": False, **opts}))
    return t.load(tok, 3, 0, t.options({"context_tokens": 256, **opts}))


@pytest.mark.parametrize("task", ["needle", "jsonl"])
@pytest.mark.parametrize("chat", [None, False])
def test_the_question_chunk_is_the_question(tok, qa_file, task, chat):
    agnostic = _load(tok, task, qa_file, chat=chat, query_aware=False)
    aware = _load(tok, task, qa_file, chat=chat, query_aware=True)
    for a, b in zip(agnostic, aware):
        assert a.prompt_ids == b.prompt_ids and b.question_tokens == 0  # query-aware: one prompt
        q = a.question_tokens
        assert 0 < q < len(a.prompt_ids) // 2
        head, tail = tok.decode(a.prompt_ids[:-q]), tok.decode(a.prompt_ids[-q:])
        assert a.context.strip() in head and a.question.strip() in tail
        assert a.question.strip()[:3] in tok.decode(a.prompt_ids[-q:][:3])  # the tail starts at the question
        assert a.content_hash() != b.content_hash()


def test_defaults_needle_one_prompt_jsonl_query_agnostic(tok, qa_file):
    """``needle`` (a 256-token task whose published results are one prompt) keeps one prompt by default; ``jsonl``
    follows kvpress (query-agnostic) for context/question lines and keeps ``prompt`` lines whole."""
    assert all(s.question_tokens == 0 and s.question for s in _load(tok, "needle", qa_file))
    t = get_task("jsonl")
    rows = t.load(tok, 4, 0, t.options({"path": str(qa_file), "shuffle": False}))
    assert [s.question_tokens > 0 for s in rows] == [True, True, True, False]
    assert rows[3].context is None and rows[0].context == QUESTIONS[0][0]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ({"prompt": "a", "context": "b", "question": "c"}, "not both"),
        ({"context": "b"}, "'context' and 'question'"),
        ({"question": 3, "context": "b"}, "'context' and 'question'"),
        ({"answer": "a"}, "'prompt'"),
    ],
)
def test_jsonl_bad_lines_name_the_line(tok, tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "fine"}\n' + json.dumps(line) + "\n")
    t = get_task("jsonl")
    with pytest.raises(TaskError, match=rf"bad.jsonl:2: .*{message}"):
        t.load(tok, 1, 0, t.options({"path": str(path)}))


# ------------------------------------------------------------------------------------------ through the protocol
@pytest.fixture(scope="module")
def ctx(tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # larger weights: well separated logits, so a wrong entry cannot hide behind a tie
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(4.0)
    kvpolicy.attach(model)
    return make_context(model, tok, kl_topk=0)


def _short(samples, max_new=4):
    for s in samples:
        s.max_new_tokens = max_new
    return samples


@pytest.mark.parametrize("task", ["needle", "jsonl"])
@pytest.mark.parametrize("query_aware", [False, True])
def test_ratio_zero_equals_the_full_cache(ctx, tok, qa_file, task, query_aware):
    samples = _short(_load(tok, task, qa_file, query_aware=query_aware))
    assert len({len(s.prompt_ids) for s in samples}) > 1  # the batch is left-padded
    targets = [s.target_ids for s in samples]
    full = run_exact(ctx, samples, None, targets)
    for policy in (keep_all_policy(), first_last_policy(Budget(ratio=0.0), decode=True)):
        for a, b, t in zip(full, run_exact(ctx, samples, policy, targets), targets):
            assert a.generation == b.generation and len(a.generation) > 0
            assert len(a.logp_steps) == len(b.logp_steps) == len(t) > 1
            assert all(torch.equal(x, y) for x, y in zip(a.logp_steps, b.logp_steps)), policy.name


@pytest.mark.parametrize("task", ["needle", "jsonl"])
@pytest.mark.parametrize("query_aware", [False, True])
def test_question_entries_are_never_compressed_at_prefill(ctx, tok, qa_file, task, query_aware):
    samples = _load(tok, task, qa_file, query_aware=query_aware)
    cache = kvpolicy.make_cache(ctx.model, first_last_policy(Budget(ratio=0.5)))
    inputs = batch_inputs(ctx, samples)
    prefill(ctx, inputs, cache)
    width = inputs.mask.shape[1]
    for r, s in enumerate(samples):
        n, q = len(s.prompt_ids), s.question_tokens
        for layer in cache.policy_layers:
            held = layer.kept_positions(r)
            if query_aware:  # one prompt, compressed together
                assert q == 0 and len(held) == -(-n // 2)
            else:  # the context compressed alone (FirstLast keeps its first half), every question entry held
                assert held[-q:] == list(range(width - q, width)) and len(held) == -(-(n - q) // 2) + q


# ------------------------------------------------------------------------------------------ compare's resume check
@pytest.mark.parametrize(
    ("recorded", "task", "options", "done"),
    [
        (None, "needle", {}, True),  # a needle cell from before the option: one prompt, its default
        (None, "needle", {"query_aware": False}, False),
        (None, "ruler", {}, False),  # a ruler cell from before the option: one prompt, not its default
        (None, "ruler", {"query_aware": True}, True),
        (True, "needle", {}, True),
        (False, "needle", {}, False),
        (False, "jsonl", {"path": "x.jsonl"}, True),
        (None, "continuation", {}, True),  # no option at all
    ],
)
def test_compare_resumes_a_cell_only_in_its_mode(tmp_path, recorded, task, options, done):
    from kvpolicy.eval import EvalSpec
    from kvpolicy.eval.compare import is_done
    from kvpolicy.hardware import dtype_name, resolve_dtype

    spec = EvalSpec(task=task, task_options=options, policy="local", ratio=0.5, samples=2)
    doc = {"spec": spec.model_dump(mode="json"), "task": {"query_aware": recorded}, "complete": True,
           "dtype": dtype_name(resolve_dtype(spec.dtype, spec.device))}
    path = tmp_path / "cell.json"
    path.write_text(json.dumps(doc))
    assert is_done(path, spec) is done
