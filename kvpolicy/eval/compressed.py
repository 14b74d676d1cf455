"""Compress a context once, then answer several questions from it, each from its own copy of the compressed cache.

Why: the query-agnostic setting (prefix caching, multi-turn chat, kvpress's pipeline) compresses a document before
any question exists and then serves many questions from the one compressed cache. Re-running the prefill per question
would both cost a prefill each time and hide what the setting is about: a policy that could not see the question.

:func:`compress_context` prefills the context(s) through the policy's cache once (the policy compresses them);
:meth:`CompressedContext.answer` deep-copies that cache, appends the question uncompressed
(:meth:`~kvpolicy.core.cache.PolicyCache.appending`) and decodes greedily, with the policy's decode rule counting its
budget from the cache as it stands after the question. The forwards are the evaluation protocol's own
(:func:`~.prefill.prefill_context`, :func:`~.prefill.append_question`, :func:`~.protocol.generate`), so an answer here is token for token, logit for logit the answer ``kvpolicy run`` computes
for the same context and question in its query-agnostic mode. Questions never see each other: each starts from a fresh
copy, and the compressed cache itself is never written to after :func:`compress_context`.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Union

import torch

from ..core.policy import CachePolicy
from .context import Context, make_context
from .prefill import append_question, batch_inputs, mrope_model, prefill_context
from .protocol import Decode, ExactRecorder, Recorder, RowRun, Stepper, check_finite, generate
from .tasks import Sample, bos_prefix, encode, has_chat_template, text_tokenizer

#: one context or question: text, or token ids (already rendered, used as given)
Text = Union[str, Sequence[int]]

#: stands for the question while the chat template is rendered around the context, then cut out (as kvpress does)
QUESTION_MARK = "\x00kvpolicy-question\x00"


@dataclass
class Answer:
    """One row's answer: the generated ids (the end-of-sequence token included when generated), their text, the
    question's ids as appended, and, when asked for (``scores=True``), every generated step's log-probability row
    (float32, ``[vocab]``; step 0 is the distribution right after the question)."""

    text: str
    ids: list[int]
    question_ids: list[int]
    logprobs: list[torch.Tensor] | None = None


def rows_of(value: Text | Sequence[Text], what: str) -> tuple[list[Text], bool]:
    """``(rows, single)``: one text or id list is a batch of one (``single``), a sequence of them a batch."""
    if isinstance(value, str) or (
        isinstance(value, Sequence) and len(value) > 0 and all(isinstance(i, int) for i in value)
    ):
        return [value], True
    rows = list(value)
    if not rows or not all(isinstance(r, str) or isinstance(r, Sequence) for r in rows):
        raise ValueError(f"{what}: a string, a list of token ids, or a non-empty list of those")
    return rows, False


def chat_split(tokenizer: Any, context: str, chat: bool | None) -> tuple[list[int], str]:
    """``(context ids, what follows the context)`` of a one-turn prompt whose user message is the context followed by
    a question: the chat template (or the plain format of :func:`~.tasks.chat_prompt`) rendered with a mark where the
    question goes, cut at the mark. The context's ids never depend on the question."""
    if not (has_chat_template(tokenizer) if chat is None else chat):
        return bos_prefix(tokenizer) + encode(tokenizer, context), "\n"
    tok = text_tokenizer(tokenizer)
    messages = [{"role": "user", "content": context + QUESTION_MARK}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if text.count(QUESTION_MARK) != 1:
        raise ValueError("compress_context: the chat template does not keep the user message as written; pass chat=False")
    head, tail = text.split(QUESTION_MARK)
    return encode(tokenizer, head), tail


class CompressedContext:
    """Context(s) prefilled and compressed once; :meth:`answer` serves questions from copies. Built by
    :func:`compress_context`.

    ``context_ids``: each row's context tokens as prefilled (chat template opening included). :meth:`cache` gives a
    deep copy of the compressed cache for forwards of your own (append with ``cache.appending()``; the batch is
    left-padded, ``context_mask`` is its attention mask)."""

    def __init__(
        self,
        ctx: Context,
        policy: CachePolicy | None,
        context_ids: list[list[int]],
        cache: Any,
        single: bool,
        tail: list[str] | None,
    ) -> None:
        self.ctx, self.policy, self.context_ids, self.single = ctx, policy, context_ids, single
        self._cache, self._tail = cache, tail
        self.context_mask = batch_inputs(ctx, self._samples()).mask

    def cache(self) -> Any:
        """A deep copy of the compressed cache (the original stays as :func:`compress_context` left it)."""
        return copy.deepcopy(self._cache)

    def question_ids(self, question: Text, row: int = 0, answer_prefix: str = "") -> list[int]:
        """The ids appended for ``question`` after row ``row``'s context: the question, the end of the user turn and
        the assistant turn's opening (chat template), then ``answer_prefix`` (e.g. RULER's). Ids are used as given."""
        if not isinstance(question, str):
            return list(question)
        if self._tail is None:
            raise ValueError("compress_context was given token ids: give the question as token ids too")
        ids = encode(self.ctx.tokenizer, question + self._tail[row])
        return ids + (encode(self.ctx.tokenizer, answer_prefix) if answer_prefix else [])

    def generate(
        self,
        question: Text | Sequence[Text],
        *,
        max_new_tokens: int = 64,
        answer_prefix: str = "",
        scores: bool = False,
    ) -> list[Answer]:
        """Greedy answers to ``question`` (one for every context row, or one question per row), each batch of
        questions from a fresh copy of the compressed cache. ``scores=True`` keeps every step's log-probabilities."""
        questions, one = rows_of(question, "question")
        b = len(self.context_ids)
        if one:
            questions = questions * b
        if len(questions) != b:
            raise ValueError(f"question: {len(questions)} questions for {b} contexts; give one, or one per context")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: must be at least 1, got {max_new_tokens}")
        q_ids = [self.question_ids(q, r, answer_prefix) for r, q in enumerate(questions)]
        if not all(q_ids):
            raise ValueError("question: empty (nothing to append)")
        samples = self._samples(q_ids, max_new_tokens)
        inputs, cache = batch_inputs(self.ctx, samples), self.cache()
        logits0 = append_question(self.ctx, inputs, cache).logits[:, -1].to(torch.float32)
        check_finite(logits0, samples, "question", "compress_context")
        rows = [RowRun() for _ in samples]
        recorder = ExactRecorder() if scores else Recorder()
        d = Decode(self.ctx, samples, rows, recorder, Stepper(self.ctx, inputs, None), logits0, inputs.mask, "answer")
        generate(d, cache, [scores] * b)
        return [
            Answer(self.ctx.decode(r.generation or []), list(r.generation or []), q, r.logp_steps if scores else None)
            for r, q in zip(rows, q_ids)
        ]

    def answer(
        self, question: Text | Sequence[Text], *, max_new_tokens: int = 64, answer_prefix: str = ""
    ) -> str | list[str]:
        """The greedy answer's text: a string for one context, a list for a batch (see :meth:`generate`)."""
        texts = [a.text for a in self.generate(question, max_new_tokens=max_new_tokens, answer_prefix=answer_prefix)]
        return texts[0] if self.single else texts

    def _samples(self, q_ids: list[list[int]] | None = None, max_new_tokens: int = 1) -> list[Sample]:
        """The protocol's samples: each context, followed by its question chunk when there is one."""
        return [
            Sample(
                id=f"row-{r}",
                prompt_ids=c + (q_ids[r] if q_ids else []),
                question_tokens=len(q_ids[r]) if q_ids else 0,
                generate=True,
                max_new_tokens=max_new_tokens,
            )
            for r, c in enumerate(self.context_ids)
        ]


def compress_context(
    model: Any,
    tokenizer: Any,
    policy: CachePolicy | None,
    context: Text | Sequence[Text],
    *,
    chat: bool | None = None,
) -> CompressedContext:
    """Prefill ``context`` (a text, token ids, or a list of either for a left-padded batch) through ``policy``'s cache
    once; ``policy=None`` keeps the full cache (transformers' ``DynamicCache``, for comparison). Text is rendered as
    the start of the user turn of the chat template (``chat=None``: when the tokenizer has one; ``False``: the plain
    format, BOS + text), the question later completing the turn. Call :func:`kvpolicy.attach` on the model first."""
    from transformers import DynamicCache

    from ..core.engine import make_cache

    if mrope_model(model) is not None:
        raise ValueError("compress_context: M-RoPE models (Qwen2-VL) are not supported; use the evaluation harness")
    rows, single = rows_of(context, "context")
    texts = all(isinstance(r, str) for r in rows)
    if not texts and any(isinstance(r, str) for r in rows):
        raise ValueError("context: all texts or all token ids, not both")
    if texts and tokenizer is None:
        raise ValueError("context: text needs a tokenizer; give token ids without one")
    split = [chat_split(tokenizer, str(r), chat) for r in rows] if texts else None
    ids = [s[0] for s in split] if split else [list(r) for r in rows]
    if not all(ids):
        raise ValueError("context: empty (nothing to compress)")
    ctx = make_context(model, tokenizer, kl_topk=0)
    cache = make_cache(model, policy, tokenizer) if policy is not None else DynamicCache(config=model.config)
    compressed = CompressedContext(ctx, policy, ids, cache, single, [s[1] for s in split] if split else None)
    out = prefill_context(ctx, batch_inputs(ctx, compressed._samples()), cache)
    check_finite(out.logits[:, -1], compressed._samples(), "context prefill", "compress_context")
    return compressed


__all__ = ["Answer", "CompressedContext", "Text", "compress_context", "rows_of"]
