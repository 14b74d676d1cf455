"""What every task builds on: :class:`Sample`, the task registry, tokenisation and prompt helpers (text and image).

The tasks themselves live in :mod:`.text` and :mod:`.image`; both import from here and never from each other.
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

from pydantic import BaseModel


@dataclass
class Sample:
    """One evaluation sample, already tokenised.

    ``target_ids`` is the gold continuation/answer teacher-forced through the cache; ``None`` means "the full-cache
    greedy answer" (computed once and cached, see :mod:`kvpolicy.eval.references`). ``generate``: the policy's own
    greedy answer is produced too (for ROUGE-L against the full cache's, and ``answers`` string match).
    ``extra`` holds model inputs beside ``input_ids`` for the prefill only (``pixel_values`` of an image prompt).
    ``context`` and ``question`` are the user turn's two texts (``context + question``), kept apart for protocols
    that compress the context before the question is known; ``answers`` are the gold strings the generation is
    scored against, by ``match``: RULER's ``string_match_all`` (``"all"``, the fraction found) or
    ``string_match_part`` (``"part"``, any one found).
    """

    id: str
    prompt_ids: list[int]
    target_ids: list[int] | None = None
    generate: bool = False
    max_new_tokens: int = 32
    answers: list[str] | None = None
    kind: str = ""
    context: str | None = None
    question: str | None = None
    match: Literal["all", "part"] = "all"
    question_tokens: int = 0
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
        if self.question_tokens:  # the two-chunk prefill is another computation (keys of one-chunk samples unchanged)
            doc["question_tokens"] = self.question_tokens
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

    def check(self, tokenizer: Any, samples: int, seed: int, options: BaseModel) -> None:
        """Raise :class:`TaskError` when :meth:`load` could not give what ``options`` ask with this tokenizer (a
        prompt length the data cannot fill). Run before the model loads when the tokenizer is on disk
        (:func:`kvpolicy.eval.preflight.prepare`); :meth:`load` must refuse the same cases. Default: nothing to
        check."""


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


def question_tokens(tokenizer: Any, prompt_ids: list[int], context: str, question: str, chat: bool | None) -> int:
    """How many trailing ``prompt_ids`` (a :func:`chat_prompt` of ``context + question``) form the question chunk.

    The prompt is rendered up to the question's first character (template opening and context) and matched token by
    token against ``prompt_ids``: the first id that differs (a token spanning the boundary) starts the question, so
    the two chunks concatenate to exactly the one-prompt ids. 0 when there is no question or no context before it."""
    if not question or not context:
        return 0
    if has_chat_template(tokenizer) if chat is None else chat:
        tok = text_tokenizer(tokenizer)
        user = context + question
        text = tok.apply_chat_template([{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True)
        head = encode(tokenizer, text[: text.find(user) + len(context)])
    else:
        head = bos_prefix(tokenizer) + encode(tokenizer, context)
    k = 0
    for a, b in zip(head, prompt_ids):
        if a != b:
            break
        k += 1
    return len(prompt_ids) - k if 0 < k < len(prompt_ids) else 0


def split_question(tokenizer: Any, ids: list[int], context: str, question: str, options: BaseModel) -> int:
    """``Sample.question_tokens`` under the task's ``query_aware`` option: 0 (one prompt) when query-aware, else the
    trailing tokens of ``ids`` that form the question chunk (:func:`question_tokens`)."""
    if getattr(options, "query_aware", True):
        return 0
    return question_tokens(tokenizer, ids, context, question, getattr(options, "chat", None))


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


__all__ = [
    "PLAIN_IMAGE_FORMAT",
    "TASKS",
    "ImagePosition",
    "Sample",
    "Task",
    "TaskError",
    "bos_prefix",
    "chat_prompt",
    "encode",
    "fit_lines",
    "get_task",
    "has_chat_template",
    "image_prompt",
    "load_image",
    "permutation",
    "question_tokens",
    "read_data",
    "register_task",
    "split_question",
    "text_tokenizer",
]
