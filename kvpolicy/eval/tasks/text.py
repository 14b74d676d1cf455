"""The text tasks: ``continuation``, ``instruct``, ``needle`` and ``jsonl`` (a jsonl line may carry an image too).

Each registers itself on import (:func:`~.base.register_task`); see :mod:`kvpolicy.eval.tasks` for what they measure.
"""

from __future__ import annotations

import json
import random
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .base import (
    Sample,
    Task,
    TaskError,
    bos_prefix,
    chat_prompt,
    encode,
    fit_lines,
    image_prompt,
    load_image,
    permutation,
    read_data,
    register_task,
    split_question,
)
from .split import SplitOption, draw_in_split, needles_key, split_id, split_label, split_rows


# ------------------------------------------------------------------------------------------------ continuation
class ContinuationOptions(SplitOption):
    model_config = ConfigDict(extra="forbid")
    context_tokens: int = Field(default=256, ge=8, le=1 << 16, description="prompt length in tokens")
    target_tokens: int = Field(default=32, ge=2, le=4096, description="tokens of the true continuation scored")
    kind: Literal["all", "code", "prose"] = Field(default="all", description="which windows to draw from")
    windows: Literal["short", "long"] = Field(
        default="short",
        description="short: the 199 windows of up to ~3,000 characters (~400-1,800 tokens); long: 32 windows of "
        "~48,000 characters (10k+ tokens) for long contexts",
    )


#: the committed data file of each ``windows`` option
WINDOW_FILES = {"short": "continuation", "long": "continuation_long"}


def drawn_rows(data: str, kind: str, samples: int, seed: int, split: str = "all") -> list[dict]:
    """The rows of a committed data file of one ``kind`` (or ``all``) in one ``split`` (by id, :mod:`.split`), in the
    seeded nested order (the first ``n`` of a seed are always the same rows, so a larger run reuses the references of
    a smaller one)."""
    rows = split_rows((r for r in read_data(data) if kind in ("all", r["kind"])), split, lambda r: r["id"])
    return [rows[i] for i in permutation(len(rows), samples, seed, split_label(f"{data}-{kind}", split))]


@lru_cache(maxsize=8)
def window_sizes(tokenizer: Any, data: str) -> dict[str, int]:
    """Row id -> tokens of the row's context, for every row of a committed continuation file (memoised per tokenizer:
    a sweep pays the ~1-5 s once)."""
    return {r["id"]: len(encode(tokenizer, r["context"])) for r in read_data(data)}


def check_fill(tokenizer: Any, options: ContinuationOptions, room: int) -> None:
    """Refuse a ``context_tokens`` that some window of the pool cannot fill (it would be silently shorter). The
    maximum comes from the data: the shortest window of the pool (``windows`` and ``kind``) in this tokenizer's
    tokens, plus the BOS token (so the check does not depend on ``--samples``)."""
    data = WINDOW_FILES[options.windows]
    every = window_sizes(tokenizer, data)
    sizes = {r["id"]: every[r["id"]] for r in read_data(data) if options.kind in ("all", r["kind"])}
    fewest = min(sizes, key=sizes.__getitem__)
    if room > sizes[fewest]:
        most = sizes[fewest] + options.context_tokens - room
        hint = " (windows=long holds 10k+ tokens per window)" if options.windows == "short" else ""
        raise TaskError(
            f"continuation: context_tokens={options.context_tokens} is more than the {options.windows} windows "
            f"(kind={options.kind}) hold: at most {most} with this tokenizer, window {fewest}{hint}"
        )


@register_task
class Continuation(Task):
    """PPL of the true continuation of held-out real text (stdlib source and Python docs prose)."""

    name = "continuation"
    Options = ContinuationOptions

    def check(self, tokenizer, samples, seed, options):
        check_fill(tokenizer, options, options.context_tokens - len(bos_prefix(tokenizer)))

    def load(self, tokenizer, samples, seed, options):
        out = []
        bos = bos_prefix(tokenizer)
        check_fill(tokenizer, options, options.context_tokens - len(bos))
        for r in drawn_rows(WINDOW_FILES[options.windows], options.kind, samples, seed, options.split):
            ctx = encode(tokenizer, r["context"])[-(options.context_tokens - len(bos)) :]
            tgt = encode(tokenizer, r["continuation"])[: options.target_tokens]
            out.append(
                Sample(
                    id=r["id"],
                    prompt_ids=bos + ctx,
                    target_ids=tgt,
                    kind=r["kind"],
                    meta={"source": r["source"]},
                )
            )
        return out


# ------------------------------------------------------------------------------------------------ instruct
class InstructOptions(SplitOption):
    model_config = ConfigDict(extra="forbid")
    context_tokens: int = Field(default=320, ge=32, le=1 << 16, description="prompt length budget (document clipped)")
    max_new_tokens: int = Field(default=32, ge=1, le=4096, description="length of the greedy answers")
    kind: Literal["all", "code", "prose"] = "all"
    chat: bool | None = Field(default=None, description="use the chat template (default: when the tokenizer has one)")


@register_task
class Instruct(Task):
    """An instruction over a document; the full-cache greedy answer is the reference (ROUGE-L, PPL, KL)."""

    name = "instruct"
    Options = InstructOptions

    def load(self, tokenizer, samples, seed, options):
        out = []
        for r in drawn_rows("instruct", options.kind, samples, seed, options.split):

            def render(doc: str, r=r) -> str:
                block = f"```python\n{doc}\n```" if r["kind"] == "code" else doc
                return f"{block}\n\n{r['instruction']}"

            def measure(doc: str) -> int:
                return len(chat_prompt(tokenizer, render(doc), chat=options.chat))

            doc = fit_lines(r["document"], options.context_tokens, measure)
            if not doc.strip():
                raise TaskError(f"instruct: context_tokens={options.context_tokens} leaves no room for {r['id']}")
            out.append(
                Sample(
                    id=r["id"],
                    prompt_ids=chat_prompt(tokenizer, render(doc), chat=options.chat),
                    target_ids=None,
                    generate=True,
                    max_new_tokens=options.max_new_tokens,
                    kind=r["kind"],
                    meta={"source": r["source"], "instruction": r["instruction"]},
                )
            )
        return out


# ------------------------------------------------------------------------------------------------ needle
ADJECTIVES = (
    "amber bold brave bright calm clever cosmic crimson curious daring dusty eager early fancy gentle golden grand "
    "happy hidden honest humble icy jolly kind lively lucky mellow misty modest noble odd pale proud quick quiet "
    "rapid rare royal rusty silent silver simple sleepy smooth solar steady stormy sunny swift tidy upbeat vivid "
    "warm wild windy wise young zesty"
).split()
NOUNS = (
    "anchor apple arrow badge banjo beacon bison breeze cactus canyon castle cedar comet coral cotton crane desert "
    "dolphin dragon falcon feather forest fossil garden glacier harbor hazel island jaguar kettle lagoon lantern "
    "lemon lotus magnet maple meadow meteor mirror nectar oasis orchid otter panda pepper pigeon planet quartz "
    "rabbit river rocket saddle salmon spruce summit thunder tiger tulip valley violin walnut willow zephyr"
).split()


class NeedleOptions(SplitOption):
    model_config = ConfigDict(extra="forbid")
    context_tokens: int = Field(default=256, ge=64, le=1 << 17, description="prompt length in tokens (approximate)")
    variants: list[Literal["single", "multikey", "vt"]] = Field(
        default=["single", "multikey", "vt"], min_length=1, description="RULER variants, cycled over the samples"
    )
    keys: int = Field(default=4, ge=2, le=64, description="needles in a multikey sample (one is asked for)")
    hops: int = Field(default=3, ge=1, le=16, description="assignments after the first one in a vt chain")
    haystack: Literal["prose", "noise"] = Field(
        default="prose", description="Python reference-manual paragraphs, or RULER's repeated 'grass is green' noise"
    )
    chat: bool | None = None
    query_aware: bool = Field(
        default=True,
        description="true (this short task's published protocol): context and question are one prompt, compressed "
        "together; false (kvpress's): the context is compressed before the question is appended uncompressed",
    )


NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."


@register_task
class Needle(Task):
    """RULER-style synthetic retrieval, generated locally from a seed (``single``, ``multikey``, ``vt``)."""

    name = "needle"
    Options = NeedleOptions

    def load(self, tokenizer, samples, seed, options):
        sentences = self._sentences(options.haystack)
        lengths = [len(encode(tokenizer, " " + s)) for s in sentences]
        out = []
        for i in range(samples):
            variant = options.variants[i % len(options.variants)]
            (needles, question, prefix, answers), rng = draw_in_split(  # split: by the needles (.split)
                options.split, f"needle-{seed}-{i}", lambda r, v=variant: getattr(self, f"_{v}")(r, options),
                lambda drawn: needles_key(drawn[0]))
            # haystack: consecutive sentences from a random start until the token budget is used
            overhead = len(chat_prompt(tokenizer, " ".join(needles) + "\n\n" + question, prefix, options.chat))
            budget = options.context_tokens - overhead
            if budget < 0:
                raise TaskError(
                    f"needle: context_tokens={options.context_tokens} is shorter than the needles and question alone "
                    f"({overhead} tokens)"
                )
            start = rng.randrange(len(sentences))
            hay, used, j = [], 0, start
            while used < budget and len(hay) < 100000:
                k = j % len(sentences)
                if used + lengths[k] > budget:
                    break
                hay.append(sentences[k])
                used += lengths[k]
                j += 1
            # needles at sorted random depths (a vt chain stays in order)
            slots = sorted(rng.randint(0, len(hay)) for _ in needles)
            for offset, (slot, needle) in enumerate(zip(slots, needles)):
                hay.insert(slot + offset, needle)
            context = " ".join(hay) + "\n\n"  # the user turn is context + question
            ids = chat_prompt(tokenizer, context + question, prefix, options.chat)
            out.append(
                Sample(
                    id=split_id(f"needle-{variant}-{seed}", options.split, i),
                    prompt_ids=ids,
                    question_tokens=split_question(tokenizer, ids, context, question, options),
                    target_ids=encode(tokenizer, " " + ", ".join(answers)),
                    generate=True,
                    max_new_tokens=8 + 6 * len(answers),
                    answers=answers,
                    kind=variant,
                    context=context,
                    question=question,
                    meta={"depths": [s / max(1, len(hay) - len(needles)) for s in slots]},
                )
            )
        return out

    @staticmethod
    def _sentences(haystack: str) -> list[str]:
        if haystack == "noise":
            return [s.strip() + "." for s in NOISE.split(".") if s.strip()]
        sents = []
        for row in read_data("haystack"):
            for s in row["text"].replace("e.g.", "e.g").replace("i.e.", "i.e").split(". "):
                s = s.strip()
                if len(s) > 20:
                    sents.append(s if s.endswith(".") else s + ".")
        return sents

    @staticmethod
    def _key(rng: random.Random) -> str:
        return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"

    def _single(self, rng, options):
        key, value = self._key(rng), str(rng.randint(1_000_000, 9_999_999))
        needle = f"One of the special magic numbers for {key} is: {value}."
        question = f"What is the special magic number for {key} mentioned in the provided text?"
        prefix = f"The special magic number for {key} mentioned in the provided text is"
        return [needle], question, prefix, [value]

    def _multikey(self, rng, options):
        keys: list[str] = []
        while len(keys) < options.keys:
            k = self._key(rng)
            if k not in keys:
                keys.append(k)
        values = [str(rng.randint(1_000_000, 9_999_999)) for _ in keys]
        needles = [f"One of the special magic numbers for {k} is: {v}." for k, v in zip(keys, values)]
        pick = rng.randrange(len(keys))
        question = f"What is the special magic number for {keys[pick]} mentioned in the provided text?"
        prefix = f"The special magic number for {keys[pick]} mentioned in the provided text is"
        return needles, question, prefix, [values[pick]]

    def _vt(self, rng, options):
        letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
        names: list[str] = []
        while len(names) < options.hops + 1:
            n = "".join(rng.choice(letters) for _ in range(5))
            if n not in names:
                names.append(n)
        value = str(rng.randint(10_000, 99_999))
        needles = [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
        question = f"Find all variables that are assigned the value {value} in the text above."
        prefix = (
            f"According to the chain of variable assignments in the text above, {len(names)} variables are assigned "
            f"the value {value}, they are:"
        )
        return needles, question, prefix, names


# ------------------------------------------------------------------------------------------------ jsonl
class JsonlOptions(SplitOption):
    model_config = ConfigDict(extra="forbid")
    path: str = Field(
        description="a .jsonl file: one object per line with 'prompt' (or 'context' and 'question'), optional "
        "'answer', 'image', 'id'"
    )
    max_new_tokens: int = Field(default=64, ge=1, le=4096)
    chat: bool | None = None
    shuffle: bool = Field(default=True, description="draw the samples with the seeded permutation (else file order)")
    query_aware: bool = Field(
        default=False,
        description="false (kvpress's protocol): a line's 'context' is compressed before its 'question' is appended "
        "uncompressed; true: context and question are one prompt. Lines with a 'prompt' are always one prompt",
    )


def jsonl_rows(path: Path) -> list[dict[str, Any]]:
    """The file's lines as dicts, each checked: a string ``prompt``, or string ``context`` and ``question`` (the user
    turn is ``context + question``), not both; ``id`` defaults to ``<stem>-<line>``."""
    rows = []
    with path.open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise TaskError(f"{path}:{n}: not JSON ({exc})") from exc
            if not isinstance(row, dict):
                raise TaskError(f"{path}:{n}: each line needs a string 'prompt', or 'context' and 'question'")
            split = [k for k in ("context", "question") if k in row]
            if split and "prompt" in row:
                raise TaskError(f"{path}:{n}: give 'prompt', or 'context' and 'question', not both")
            fields = ("context", "question") if split else ("prompt",)
            if not all(isinstance(row.get(k), str) for k in fields):
                raise TaskError(f"{path}:{n}: each line needs a string 'prompt', or 'context' and 'question'")
            row.setdefault("id", f"{path.stem}-{n:05d}")
            rows.append(row)
    return rows


@register_task
class Jsonl(Task):
    """Any user file: ``{"prompt": ..., "answer": ... (optional), "image": path (optional), "id": ... (optional)}``,
    or ``"context"`` and ``"question"`` instead of ``"prompt"`` (the user turn is their concatenation).

    With an ``answer`` the answer is teacher-forced (PPL of the ground truth, the authors' protocol) and the generation
    is scored by string match against it (``match``: RULER's ``string_match_all`` of one answer); without one the
    full-cache greedy answer is the reference. A context/question line is prefilled in two chunks unless
    ``query_aware`` (the query-agnostic protocol, ``docs/evaluation.md``); a ``prompt`` line, or a line with an image,
    is one prompt. Image paths are relative to the file; an image needs a vision-language model whose loader returned
    a processor."""

    name = "jsonl"
    Options = JsonlOptions

    def load(self, tokenizer, samples, seed, options):
        path = Path(options.path).expanduser()
        if not path.exists():
            raise TaskError(f"jsonl task: file {str(path)!r} does not exist")
        rows = split_rows(jsonl_rows(path), options.split, lambda r: str(r["id"]))
        if samples > len(rows):
            where = "" if options.split == "all" else f" in split {options.split!r}"
            raise TaskError(f"{path} has {len(rows)} samples{where}; asked for {samples}")
        label = split_label(f"jsonl-{path.name}", options.split)
        order = permutation(len(rows), samples, seed, label) if options.shuffle else range(samples)
        return [self.sample(tokenizer, rows[i], path, options) for i in order]

    @staticmethod
    def sample(tokenizer: Any, r: dict[str, Any], path: Path, options: JsonlOptions) -> Sample:
        answer = r.get("answer")
        context, question = r.get("context"), r.get("question")
        user = r["prompt"] if context is None else context + question
        extra: dict[str, Any] = {}
        split = 0
        if r.get("image"):
            image = load_image(path.parent / r["image"], f"{path}: sample {r['id']}")
            ids, extra = image_prompt(tokenizer, image, user, chat=options.chat)
        else:
            ids = chat_prompt(tokenizer, user, chat=options.chat)
            if context is not None:
                split = split_question(tokenizer, ids, context, question, options)
        return Sample(
            id=str(r["id"]),
            prompt_ids=ids,
            question_tokens=split,
            target_ids=encode(tokenizer, answer) if isinstance(answer, str) and answer else None,
            answers=[answer] if isinstance(answer, str) and answer else None,
            generate=True,
            max_new_tokens=options.max_new_tokens,
            kind="image" if extra else "text",
            context=context,
            question=question,
            extra=extra,
        )


__all__ = ["Continuation", "Instruct", "Jsonl", "Needle"]
