"""The ``ruler`` task: RULER's 11 synthetic tasks (Hsieh et al., 2024), generated offline at any ``context_tokens``.

``niah_single_1/2/3``, ``niah_multikey_1/2/3``, ``niah_multivalue``, ``niah_multiquery``, ``vt``, ``cwe`` and
``fwe``, with RULER's templates, settings and answer prefixes (:mod:`.ruler_text`) and its generators
(:mod:`.ruler_gen`); RULER's two QA tasks need SQuAD and HotpotQA, which are not available offline, and are left out.
Every sample is scored by RULER's ``string_match_all``; the report gives one score per task and their mean
(:mod:`kvpolicy.eval.aggregate`).

Length: ``context_tokens`` is the whole prompt in the model's own tokens (chat template and answer prefix included,
the generated answer not; RULER's ``max_seq_length`` counts the answer's ``tokens_to_generate`` too). Each sample's
haystack is the largest that fits, found by binary search over RULER's haystack unit, then topped up with noise
sentences where a unit is coarse (a distractor needle), so prompts land within 2% below ``context_tokens``. A length
the committed data cannot fill is an error naming the maximum.

Samples: ``--samples`` counts them in total, dealt round-robin over the selected ``tasks`` (so the first ``n`` of a
larger run are the same ``n``); sample ``j`` of a task comes from ``random.Random(f"ruler-{task}-{seed}-{j}")``.
``split: dev | test`` keeps the candidates whose needles (:func:`needle_key`) hash into the split (:mod:`.split`).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .base import Sample, Task, TaskError, chat_prompt, encode, register_task, split_question
from .ruler_gen import CommonWords, FreqWords, Niah, Parts, VariableTracking
from .ruler_text import CWE_NUM, NIAH_TASKS, RULER_TASKS, TOKENS_TO_GENERATE, RulerTaskName, family
from .split import SplitOption, draw_in_split, needles_key, split_id

#: a fitted prompt is at least this fraction of ``context_tokens``
LENGTH_TOLERANCE = 0.98
#: RULER's in-context example for ``vt`` is generated at 500 tokens
VT_EXAMPLE_TOKENS = 500
#: RULER switches ``cwe`` to its long setting from a 4,096-token sequence (prompt plus answer)
CWE_LONG_FROM = 4096


class RulerOptions(SplitOption):
    model_config = ConfigDict(extra="forbid")
    context_tokens: int = Field(
        default=4096, ge=256, le=1 << 20, description="prompt length in the model's tokens (the field's standard: 4096)"
    )
    tasks: list[RulerTaskName] = Field(
        default_factory=lambda: list(RULER_TASKS), min_length=1, description="a subset of the 11 tasks (comma list)"
    )
    max_new_tokens: int | None = Field(
        default=None, ge=1, le=4096, description="answer length (default: RULER's, niah 128, vt 30, cwe 120, fwe 50)"
    )
    chat: bool | None = Field(default=None, description="use the chat template (default: when the tokenizer has one)")
    query_aware: bool = Field(
        default=False,
        description="false (kvpress's protocol): the context is compressed before the question is appended "
        "uncompressed; true: context and question are one prompt, compressed together",
    )

    @field_validator("tasks", mode="before")
    @classmethod
    def comma_list(cls, value: Any) -> Any:
        """``tasks=vt,cwe`` on the command line is one string; a YAML list passes through. Repeats are dropped."""
        if isinstance(value, str):
            value = [t.strip() for t in value.split(",") if t.strip()]
        if isinstance(value, list):
            value = list(dict.fromkeys(value))
        return value


class Generator(Protocol):
    """What :func:`fit` needs of a generator (:mod:`.ruler_gen`)."""

    @property
    def max_units(self) -> int | None: ...

    @property
    def max_fill(self) -> int: ...

    def render(self, units: int, fill: int) -> Parts: ...


def largest(ok: Callable[[int], bool], lo: int, hi: int) -> int:
    """The largest ``x`` in ``[lo, hi]`` with ``ok(x)``, by binary search (``ok(lo)`` is assumed)."""
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def fit(gen: Generator, measure: Callable[[Parts], int], budget: int, what: str) -> tuple[Parts, int, int]:
    """``(parts, tokens, units)``: the sample with the largest haystack whose ``measure`` is at most ``budget``."""

    def tokens(units: int, fill: int) -> int:
        return measure(gen.render(units, fill))

    bare = tokens(0, 0)
    if bare > budget:
        raise TaskError(f"ruler {what}: context_tokens={budget} is shorter than its template and needles ({bare})")
    top = gen.max_units
    if top is None:
        hi = 1
        while tokens(hi, 0) <= budget and hi < 1 << 24:
            hi *= 2
        units = largest(lambda n: tokens(n, 0) <= budget, hi // 2, hi - 1)
    else:
        units = largest(lambda n: tokens(n, 0) <= budget, 0, top)
    fill = largest(lambda k: tokens(units, k) <= budget, 0, gen.max_fill)
    parts = gen.render(units, fill)
    used = measure(parts)
    if top is not None and units == top and used < LENGTH_TOLERANCE * budget:
        raise TaskError(
            f"ruler {what}: context_tokens={budget} is more than the committed data can fill; at most {used} "
            f"tokens with this tokenizer"
        )
    return parts, used, units


def spread(tasks: list[str], samples: int) -> list[tuple[str, int]]:
    """``(task, index within the task)`` of ``samples`` samples dealt round-robin over ``tasks``."""
    return [(tasks[i % len(tasks)], i // len(tasks)) for i in range(samples)]


@register_task
class Ruler(Task):
    """RULER's synthetic long-context tasks, generated offline; string match per task and averaged."""

    name = "ruler"
    Options = RulerOptions

    def load(self, tokenizer: Any, samples: int, seed: int, options: BaseModel) -> list[Sample]:
        assert isinstance(options, RulerOptions)
        return [self.sample(tokenizer, task, j, seed, options) for task, j in spread(list(options.tasks), samples)]

    def draw(self, task: str, rng: random.Random, options: RulerOptions) -> tuple[Generator, Any]:
        """A sample's random content, drawn without tokenising: the generator, and for ``vt`` the in-context example
        still to be fitted (:meth:`generator` does that) - so that a split can reject candidates cheaply."""
        if task in NIAH_TASKS:
            return Niah(rng, NIAH_TASKS[task]), None
        if task == "cwe":
            answer = options.max_new_tokens or TOKENS_TO_GENERATE["cwe"]
            return CommonWords(rng, long=options.context_tokens + answer >= CWE_LONG_FROM), None
        if task == "fwe":
            return FreqWords(rng, options.context_tokens), None
        example = VariableTracking(rng, example=True)
        return VariableTracking(rng), example  # the same draws, in the same order, as with the example fitted first

    def generator(self, tokenizer: Any, drawn: tuple[Generator, Any]) -> Generator:
        gen, example = drawn
        if example is not None:

            def plain(p: Parts) -> int:
                return len(encode(tokenizer, p.context + p.question + p.answer_prefix))

            shot, _, _ = fit(example, plain, VT_EXAMPLE_TOKENS, "vt example")
            gen.icl = example.solved(shot)
        return gen

    def sample(self, tokenizer: Any, task: str, j: int, seed: int, options: RulerOptions) -> Sample:
        drawn, _ = draw_in_split(options.split, f"ruler-{task}-{seed}-{j}", lambda r: self.draw(task, r, options),
                                 lambda d: needle_key(d[0]))
        gen = self.generator(tokenizer, drawn)

        def prompt(p: Parts) -> list[int]:
            return chat_prompt(tokenizer, p.context + p.question, p.answer_prefix.strip(), options.chat)

        parts, used, units = fit(gen, lambda p: len(prompt(p)), options.context_tokens, task)
        if task == "fwe":
            check_fwe_answer(gen, units)
        ids = prompt(parts)
        return Sample(
            id=split_id(f"ruler-{task}-{seed}", options.split, j),
            prompt_ids=ids,
            question_tokens=split_question(tokenizer, ids, parts.context, parts.question, options),
            target_ids=encode(tokenizer, parts.target),
            generate=True,
            max_new_tokens=options.max_new_tokens or TOKENS_TO_GENERATE[family(task)],
            answers=list(parts.answers),
            kind=task,
            context=parts.context,
            question=parts.question,
            meta={"answer_prefix": parts.answer_prefix, "haystack_units": units},
        )


def needle_key(gen: Generator) -> str:
    """What a sample hides and asks about, which decides its split: the needles (niah), the variable chain (vt), the
    common words to list (cwe), the three most frequent coded words (fwe)."""
    if isinstance(gen, Niah):
        return needles_key(gen.needles)
    if isinstance(gen, VariableTracking):
        return needles_key(gen.chain)
    if isinstance(gen, CommonWords):
        return "cwe:" + " ".join(gen.words[:CWE_NUM])
    assert isinstance(gen, FreqWords)
    return "fwe:" + " ".join(gen.vocab[1:4])


def check_fwe_answer(gen: Generator, units: int) -> None:
    """RULER's ``fwe`` answer is only well defined when the third answer word is strictly more frequent than the next
    word (short contexts can tie them)."""
    assert isinstance(gen, FreqWords)
    counts = gen.counts(units)
    if len(counts) < 5 or counts[3] <= counts[4]:
        raise TaskError(f"ruler fwe: {units} words leave the three most frequent words tied; use more context_tokens")


__all__ = ["LENGTH_TOLERANCE", "Ruler", "RulerOptions", "check_fwe_answer", "fit", "largest", "needle_key", "spread"]
