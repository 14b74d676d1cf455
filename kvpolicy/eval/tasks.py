"""Evaluation tasks: small pluggable loaders that turn committed data into token-id samples, deterministically.

A task is a class with a ``name``, a pydantic ``Options`` model (its settings, e.g. ``context_tokens``) and a method
``load(tokenizer, samples, seed, options) -> list[Sample]``. Register new ones with :func:`register_task`; the runner
looks them up by name (``EvalSpec.task``). Built in:

* ``continuation`` — a window of real text (CPython standard-library source or Python reference documentation, from
  ``kvpolicy/data/continuation.jsonl.gz``): the last ``context_tokens`` tokens of the window's first part are the
  prompt, the first ``target_tokens`` tokens of the rest are teacher-forced (PPL of the true continuation);
* ``instruct`` — an instruction about a document (summarise / explain / list / ...), rendered with the tokenizer's
  chat template; the full-cache greedy answer is the reference (the Elastic Cache paper's protocol);
* ``needle`` — RULER-style synthetic retrieval generated on the fly at ``context_tokens``: ``single`` (one needle in a
  haystack), ``multikey`` (one of several needles with different keys), ``vt`` (variable tracking through a chain of
  assignments); the gold answer is teacher-forced and the generation is scored by string match;
* ``jsonl`` — a user file with ``prompt`` and optional ``answer``, ``image`` and ``id`` per line.

Sampling is deterministic and nested: with seed ``s`` the first ``n`` samples are always the first ``n`` of the same
seeded permutation, so 50 samples are a subset of 100 and their cached references are reused.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import random
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field


@dataclass
class Sample:
    """One evaluation sample, already tokenised.

    ``target_ids`` is the gold continuation/answer teacher-forced through the cache; ``None`` means "the full-cache
    greedy answer" (computed once and cached, see :mod:`kvpolicy.eval.reference`). ``generate``: the policy's own
    greedy answer is produced too (for ROUGE-L against the full cache's, and ``answers`` string match).
    ``extra`` holds model inputs beside ``input_ids`` for the prefill only (``pixel_values`` of an image prompt).
    """

    id: str
    prompt_ids: list[int]
    target_ids: list[int] | None = None
    generate: bool = False
    max_new_tokens: int = 32
    answers: list[str] | None = None
    kind: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def content_hash(self) -> str:
        """Hash of everything that defines the sample's computation (the reference-cache key uses it)."""
        h = hashlib.sha256()
        doc = {
            "prompt": self.prompt_ids,
            "target": self.target_ids,
            "generate": self.generate,
            "max_new": self.max_new_tokens,
            "extra": sorted(self.extra),
        }
        h.update(json.dumps(doc, sort_keys=True).encode())
        for name in sorted(self.extra):
            value = self.extra[name]
            if hasattr(value, "detach"):
                h.update(value.detach().cpu().contiguous().float().numpy().tobytes())
            else:
                h.update(repr(value).encode())
        return h.hexdigest()


class TaskError(ValueError):
    """A task cannot produce the samples asked for (unknown task, too many samples, bad file)."""


# ------------------------------------------------------------------------------------------------ registry
TASKS: dict[str, type[Task]] = {}


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator: make a task available by its ``name``."""
    TASKS[cls.name] = cls
    return cls


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise TaskError(f"unknown task {name!r}; available: {', '.join(sorted(TASKS))}")
    return TASKS[name]()


class Task:
    name: ClassVar[str] = ""
    Options: ClassVar[type[BaseModel]]

    def options(self, raw: dict[str, Any] | None) -> BaseModel:
        return self.Options(**(raw or {}))

    def load(self, tokenizer: Any, samples: int, seed: int, options: BaseModel) -> list[Sample]:
        raise NotImplementedError


# ------------------------------------------------------------------------------------------------ helpers
@lru_cache(maxsize=8)
def read_data(name: str) -> tuple[dict[str, Any], ...]:
    """Rows of a committed data file ``kvpolicy/data/<name>.jsonl.gz``."""
    ref = resources.files("kvpolicy.data") / f"{name}.jsonl.gz"
    with ref.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as fh:
        return tuple(json.loads(line) for line in fh if line.strip())


def permutation(n_pool: int, samples: int, seed: int, what: str) -> list[int]:
    """The first ``samples`` indices of a seeded permutation of the pool (nested across sample counts)."""
    if samples > n_pool:
        raise TaskError(f"task {what!r} has {n_pool} samples; asked for {samples}")
    order = list(range(n_pool))
    random.Random(f"{what}-{seed}").shuffle(order)
    return order[:samples]


def text_tokenizer(tokenizer: Any) -> Any:
    """The text tokenizer of a tokenizer or a processor."""
    return getattr(tokenizer, "tokenizer", tokenizer)


def encode(tokenizer: Any, text: str) -> list[int]:
    return list(text_tokenizer(tokenizer)(text, add_special_tokens=False)["input_ids"])


def bos_prefix(tokenizer: Any) -> list[int]:
    """``[bos]`` when the tokenizer adds a BOS token to plain text by default, else ``[]``."""
    tok = text_tokenizer(tokenizer)
    bos = getattr(tok, "bos_token_id", None)
    if bos is None:
        return []
    ids = tok("a", add_special_tokens=True)["input_ids"]
    return [bos] if ids and ids[0] == bos else []


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None) or getattr(text_tokenizer(tokenizer), "chat_template", None))


def chat_prompt(tokenizer: Any, user: str, assistant_prefix: str = "", chat: bool | None = None) -> list[int]:
    """Token ids of a one-turn prompt: the chat template with a generation prompt when the tokenizer has one (or
    ``chat=True``), else the plain text (with BOS when the tokenizer adds one). ``assistant_prefix`` is appended after
    the generation prompt (RULER's answer prefix)."""
    use_chat = has_chat_template(tokenizer) if chat is None else chat
    if use_chat:
        tok = text_tokenizer(tokenizer)
        text = tok.apply_chat_template([{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True)
        ids = encode(tokenizer, text)
    else:
        ids = bos_prefix(tokenizer) + encode(tokenizer, user + "\n")
    if assistant_prefix:
        ids += encode(tokenizer, assistant_prefix)
    return ids


def fit_lines(text: str, budget: int, measure: Callable[[str], int]) -> str:
    """The longest prefix of ``text`` made of whole lines whose ``measure`` is at most ``budget`` (binary search)."""
    lines = text.splitlines(keepends=True)
    lo, hi = 0, len(lines)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if measure("".join(lines[:mid])) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return "".join(lines[:lo]).rstrip("\n")


# ------------------------------------------------------------------------------------------------ image prompts
#: where the image goes in the user turn: before the text (LLaVA's and Qwen2-VL's usual order) or after it (the Elastic
#: Cache authors' MM-Vet prompts: ``question + "\n<image>"``). A template that renders images first whatever the order
#: (llava-hf's LLaVA-1.5 template does) ignores it.
ImagePosition = Literal["before", "after"]

#: the plain prompt used when a processor has no chat template (or ``chat=False``): the processor's image placeholder
#: (wrapped in ``<|vision_start|>``/``<|vision_end|>`` when the tokenizer has them, as Qwen2-VL needs) on its own line,
#: then the text; see docs/vlm.md
PLAIN_IMAGE_FORMAT = "{image}\n{prompt}\n"


def load_image(path: str | Path, what: str = "") -> Any:
    """An image file opened with PIL and converted to RGB (vision towers take 3 channels; MM-Vet and COCO hold
    grayscale, palette and RGBA files too). Errors name the file and ``what`` (the sample) instead of a bare OSError."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path).expanduser()
    where = f" ({what})" if what else ""
    if not path.is_file():
        raise TaskError(f"image file {str(path)!r} does not exist{where}")
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise TaskError(f"image file {str(path)!r} cannot be read as an image{where}: {exc}") from exc


def _token_in_vocab(tok: Any, token: str) -> bool:
    vocab = tok.get_vocab() if hasattr(tok, "get_vocab") else {}
    return token in vocab


def image_prompt(
    processor: Any,
    image: Any,
    prompt: str,
    *,
    chat: bool | None = None,
    image_position: ImagePosition = "before",
) -> tuple[list[int], dict[str, Any]]:
    """Token ids and the extra model inputs (``pixel_values``, Qwen2-VL's ``image_grid_thw``/``mm_token_type_ids``)
    of a one-turn prompt made of one image and ``prompt``.

    With a chat template (the processor's, else its tokenizer's) and ``chat`` not ``False``, the template renders one
    user message whose content is ``[image, text]`` (``[text, image]`` for ``image_position="after"``) and opens the
    assistant turn; that is how the published checkpoints were prompted (llava-hf LLaVA-1.5: ``USER: <image>\n...
    ASSISTANT:``; Qwen2-VL: ``<|vision_start|><|image_pad|><|vision_end|>`` inside the ``<|im_start|>user`` turn,
    after the default system message). Without one the prompt is :data:`PLAIN_IMAGE_FORMAT` and a warning says so,
    rather than an error: a base checkpoint may ship no template. The processor then expands its single image
    placeholder into as many image tokens as the vision tower yields, so the ids are exactly what the model sees."""
    if not hasattr(processor, "image_processor"):
        raise TaskError(
            "a sample with an image needs a vision-language model (its processor); this model's loader returned a "
            "plain tokenizer"
        )
    tok = text_tokenizer(processor)
    template = getattr(processor, "chat_template", None) or getattr(tok, "chat_template", None)
    use_chat = bool(template) if chat is None else chat
    if use_chat:
        if not template:
            raise TaskError("chat=True but the processor (and its tokenizer) has no chat template")
        parts: list[dict[str, Any]] = [{"type": "image"}, {"type": "text", "text": prompt}]
        if image_position == "after":
            parts.reverse()
        messages = [{"role": "user", "content": parts}]
        text = processor.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=True
        )
    else:
        if chat is None:
            warnings.warn(
                f"{type(processor).__name__} has no chat template: image prompts use the plain format "
                f"{PLAIN_IMAGE_FORMAT!r} (see docs/vlm.md)",
                stacklevel=2,
            )
        placeholder = getattr(processor, "image_token", None) or "<image>"
        if _token_in_vocab(tok, "<|vision_start|>") and _token_in_vocab(tok, "<|vision_end|>"):
            placeholder = f"<|vision_start|>{placeholder}<|vision_end|>"
        text = PLAIN_IMAGE_FORMAT.format(image=placeholder, prompt=prompt)
        if image_position == "after":  # the same two lines, the other way round
            text = f"{prompt}\n{placeholder}\n"
    # as transformers' own processor.apply_chat_template(tokenize=True): no second BOS when the text carries one
    bos = getattr(tok, "bos_token", None)
    kwargs = {"add_special_tokens": False} if bos and text.startswith(bos) else {}
    enc = processor(text=[text], images=[image], return_tensors="pt", **kwargs)
    ids = enc["input_ids"][0].tolist()
    extra = {k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask")}
    return ids, extra


# ------------------------------------------------------------------------------------------------ continuation
class ContinuationOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    context_tokens: int = Field(default=256, ge=8, le=1 << 16, description="prompt length in tokens")
    target_tokens: int = Field(default=32, ge=2, le=4096, description="tokens of the true continuation scored")
    kind: Literal["all", "code", "prose"] = Field(default="all", description="which windows to draw from")


@register_task
class Continuation(Task):
    """PPL of the true continuation of held-out real text (stdlib source and Python docs prose)."""

    name = "continuation"
    Options = ContinuationOptions

    def load(self, tokenizer, samples, seed, options):
        rows = [r for r in read_data("continuation") if options.kind in ("all", r["kind"])]
        out = []
        bos = bos_prefix(tokenizer)
        for i in permutation(len(rows), samples, seed, f"continuation-{options.kind}"):
            r = rows[i]
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
class InstructOptions(BaseModel):
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
        rows = [r for r in read_data("instruct") if options.kind in ("all", r["kind"])]
        out = []
        for i in permutation(len(rows), samples, seed, f"instruct-{options.kind}"):
            r = rows[i]

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


class NeedleOptions(BaseModel):
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
            rng = random.Random(f"needle-{seed}-{i}")
            variant = options.variants[i % len(options.variants)]
            needles, question, prefix, answers = getattr(self, f"_{variant}")(rng, options)
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
            context = " ".join(hay)
            user = f"{context}\n\n{question}"
            out.append(
                Sample(
                    id=f"needle-{variant}-{seed}-{i:04d}",
                    prompt_ids=chat_prompt(tokenizer, user, prefix, options.chat),
                    target_ids=encode(tokenizer, " " + ", ".join(answers)),
                    generate=True,
                    max_new_tokens=8 + 6 * len(answers),
                    answers=answers,
                    kind=variant,
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
class JsonlOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str = Field(description="a .jsonl file: one object per line with 'prompt', optional 'answer', 'image', 'id'")
    max_new_tokens: int = Field(default=64, ge=1, le=4096)
    chat: bool | None = None
    shuffle: bool = Field(default=True, description="draw the samples with the seeded permutation (else file order)")


@register_task
class Jsonl(Task):
    """Any user file: ``{"prompt": ..., "answer": ... (optional), "image": path (optional), "id": ... (optional)}``.

    With an ``answer`` the answer is teacher-forced (PPL of the ground truth, the authors' protocol); without one the
    full-cache greedy answer is. Image paths are relative to the file; an image needs a vision-language model whose
    loader returned a processor."""

    name = "jsonl"
    Options = JsonlOptions

    def load(self, tokenizer, samples, seed, options):
        path = Path(options.path).expanduser()
        if not path.exists():
            raise TaskError(f"jsonl task: file {str(path)!r} does not exist")
        rows = []
        with path.open(encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise TaskError(f"{path}:{n}: not JSON ({exc})") from exc
                if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                    raise TaskError(f"{path}:{n}: each line needs a string 'prompt'")
                row.setdefault("id", f"{path.stem}-{n:05d}")
                rows.append(row)
        if samples > len(rows):
            raise TaskError(f"{path} has {len(rows)} samples; asked for {samples}")
        order = permutation(len(rows), samples, seed, f"jsonl-{path.name}") if options.shuffle else range(samples)
        out = []
        for i in order:
            r = rows[i]
            answer = r.get("answer")
            extra: dict[str, Any] = {}
            if r.get("image"):
                image = load_image(path.parent / r["image"], f"{path}: sample {r['id']}")
                ids, extra = image_prompt(tokenizer, image, r["prompt"], chat=options.chat)
            else:
                ids = chat_prompt(tokenizer, r["prompt"], chat=options.chat)
            out.append(
                Sample(
                    id=str(r["id"]),
                    prompt_ids=ids,
                    target_ids=encode(tokenizer, answer) if isinstance(answer, str) and answer else None,
                    generate=True,
                    max_new_tokens=options.max_new_tokens,
                    kind="image" if extra else "text",
                    extra=extra,
                )
            )
        return out


__all__ = [
    "PLAIN_IMAGE_FORMAT",
    "TASKS",
    "ImagePosition",
    "Sample",
    "Task",
    "TaskError",
    "get_task",
    "image_prompt",
    "load_image",
    "read_data",
    "register_task",
]

# the image tasks (MM-Vet, LLaVA instruct/detail) register themselves on import; imported last because they build on
# the helpers above
from . import vlm_tasks as _vlm_tasks  # noqa: F401
