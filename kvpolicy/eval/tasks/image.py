"""Image tasks: MM-Vet and the LLaVA instruction data, the two datasets of the Elastic Cache paper, as kvpolicy tasks.

Both read the data in the layout it is published in, so a user points kvpolicy at the files they downloaded:

* ``mmvet`` — the MM-Vet release: a folder with ``mm-vet.json`` (``{"v1_0": {"imagename": "v1_0.png", "question":
  ..., "answer": ..., "capability": ["rec", "ocr"]}, ...}``) and ``images/``. The Elastic Cache authors' pre-processed
  file (a JSON list of ``{"image", "question", "answer"}``) is read too.
* ``llava_detail`` — LLaVA's instruction JSON (``detail_23k.json``, ``llava_instruct_150k.json``, ...): a list of
  ``{"id", "image", "conversations": [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", "value": ...}]}``
  with the images in a separate folder (COCO ``train2017`` for these files).

Why the default target is the full cache's answer: the paper scores ROUGE-L of the compressed cache's greedy answer
against the full cache's, and PPL along that same reference, so both metrics measure how far compression moves the
model from what it would have said — not how good the model is. The dataset's own answer stays in ``Sample.meta``
(``gold``); ``target="gold"`` teacher-forces it instead, which is what the authors' ``eval_ppl.py`` does for PPL (with
``protocol="authors"`` for their unscored last token). MM-Vet answers are graded by GPT-4 in MM-Vet itself, so no
string-match metric is computed from them.

Sampling is the one of every kvpolicy task: deterministic and nested (``--samples N --seed S`` takes the first ``N``
of a seeded permutation of the file's samples). Only the images of the samples drawn are opened.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .base import (
    ImagePosition,
    Sample,
    Task,
    TaskError,
    encode,
    image_prompt,
    load_image,
    permutation,
    register_task,
)
from .split import SplitOption, split_label, split_rows

#: what is teacher-forced: the full cache's greedy answer (the paper's protocol) or the dataset's answer
TargetKind = Literal["reference", "gold"]


@dataclass(frozen=True)
class ImageRow:
    """One image question, read from a dataset file but not yet tokenised (its image is not opened yet)."""

    id: str
    image: Path
    prompt: str
    answer: str | None
    kind: str
    image_position: ImagePosition = "before"
    meta: dict[str, Any] = field(default_factory=dict)


def read_json(path: Path, task: str) -> Any:
    """A JSON file, or a :class:`TaskError` naming the task and the file."""
    if not path.is_file():
        raise TaskError(f"{task}: file {str(path)!r} does not exist")
    try:
        with path.open(encoding="utf-8") as fh:
            return json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TaskError(f"{task}: {path} is not valid JSON ({exc})") from exc


def image_samples(
    task: str,
    rows: list[ImageRow],
    tokenizer: Any,
    samples: int,
    seed: int,
    pool_key: str,
    *,
    shuffle: bool,
    target: TargetKind,
    max_new_tokens: int,
    chat: bool | None,
    split: str = "all",
) -> list[Sample]:
    """Draw ``samples`` rows of ``split`` (by id, :mod:`.split`; seeded permutation, or file order without
    ``shuffle``), open their images and build the prompts with the processor's chat template
    (:func:`kvpolicy.eval.tasks.image_prompt`)."""
    if not rows:
        raise TaskError(f"{task}: no samples to draw from")
    rows = split_rows(rows, split, lambda r: r.id)
    if samples > len(rows):
        where = "" if split == "all" else f" in split {split!r}"
        raise TaskError(f"{task}: the data has {len(rows)} samples{where}; asked for {samples}")
    order = permutation(len(rows), samples, seed, split_label(pool_key, split)) if shuffle else range(samples)
    out = []
    for i in order:
        row = rows[i]
        image = load_image(row.image, f"{task} sample {row.id!r}")
        ids, extra = image_prompt(tokenizer, image, row.prompt, chat=chat, image_position=row.image_position)
        if target == "gold":
            if not row.answer:
                raise TaskError(f"{task}: sample {row.id!r} has no answer to teacher-force (target=gold)")
            target_ids: list[int] | None = encode(tokenizer, row.answer)
        else:
            target_ids = None
        out.append(
            Sample(
                id=row.id,
                prompt_ids=ids,
                target_ids=target_ids,
                generate=True,
                max_new_tokens=max_new_tokens,
                kind=row.kind,
                extra=extra,
                meta={"gold": row.answer, "image": str(row.image), "question": row.prompt, **row.meta},
            )
        )
    return out


def _split_list(value: Any) -> Any:
    """``"ocr,math"`` -> ``["ocr", "math"]`` (a CLI ``--task-option capability=ocr,math``)."""
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return value


# ================================================================================================== MM-Vet
class MMVetOptions(SplitOption):
    model_config = ConfigDict(extra="forbid")

    path: str = Field(description="the MM-Vet folder (mm-vet.json and images/), or its mm-vet.json (images/ beside it)")
    capability: list[str] | None = Field(
        default=None,
        description="keep the samples that need any of these capabilities (rec, ocr, know, gen, spat, math); "
        "null: all 218",
    )
    target: TargetKind = Field(
        default="reference",
        description="teacher-forced target: 'reference' = the full cache's greedy answer (the paper's protocol), "
        "'gold' = MM-Vet's answer (<AND>/<OR> written as 'and'/'or'; the authors' eval_ppl.py)",
    )
    max_new_tokens: int = Field(default=1024, ge=1, le=8192, description="greedy answer length (the authors: 1024)")
    image_position: ImagePosition = Field(
        default="before",
        description="image before the question (LLaVA/Qwen2-VL convention) or after it (the authors' MM-Vet "
        "prompt); llava-hf's LLaVA-1.5 template puts images first either way",
    )
    chat: bool | None = Field(default=None, description="use the processor's chat template (default: when it has one)")
    shuffle: bool = Field(default=True, description="draw with the seeded permutation (else file order)")

    @field_validator("capability", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return _split_list(value)


def _mmvet_files(path: Path) -> tuple[Path, Path]:
    """``(mm-vet.json, images folder)`` from the folder or the json file, with errors that say what was expected."""
    path = path.expanduser()
    if not path.exists():
        raise TaskError(
            f"mmvet: {str(path)!r} does not exist; expected the MM-Vet folder (mm-vet.json and images/) or its "
            "mm-vet.json"
        )
    if path.is_dir():
        data = path / "mm-vet.json"
        if not data.is_file():
            found = ", ".join(sorted(p.name for p in path.glob("*.json"))) or "no .json file"
            raise TaskError(f"mmvet: folder {str(path)!r} has no mm-vet.json (found: {found})")
    else:
        data = path
    images = data.parent / "images"
    if not images.is_dir():
        raise TaskError(f"mmvet: no images/ folder beside {str(data)!r} (MM-Vet keeps its images in images/)")
    return data, images


def _mmvet_entries(doc: Any, data: Path) -> list[tuple[str, dict[str, Any]]]:
    """``(id, entry)`` pairs of the release's dict or of the authors' pre-processed list, in file order."""
    if isinstance(doc, dict):
        return [(str(k), v) for k, v in doc.items()]
    if isinstance(doc, list):
        return [(str(v.get("id", i)) if isinstance(v, dict) else str(i), v) for i, v in enumerate(doc)]
    raise TaskError(
        f"mmvet: {data} holds a JSON {type(doc).__name__}; expected an object of samples "
        '{"v1_0": {"imagename", "question", "answer", "capability"}, ...}'
    )


@register_task
class MMVet(Task):
    """MM-Vet (Yu et al., 2023): 218 image questions over six capabilities, in its release layout.

    The prompt is the question with the image, in the processor's chat template; the target is the full cache's
    greedy answer unless ``target="gold"``; MM-Vet's answer and capabilities are kept in ``Sample.meta``;
    ``Sample.kind`` is the sample's capabilities joined with commas (so results group by MM-Vet's capability
    integrations)."""

    name = "mmvet"
    Options = MMVetOptions

    def load(self, tokenizer, samples, seed, options):
        data, images = _mmvet_files(Path(options.path))
        doc = read_json(data, "mmvet")
        rows: list[ImageRow] = []
        seen_caps: set[str] = set()
        for key, entry in _mmvet_entries(doc, data):
            if not isinstance(entry, dict):
                raise TaskError(f"mmvet: entry {key!r} of {data} is a {type(entry).__name__}, not an object")
            image = entry.get("imagename", entry.get("image"))
            question = entry.get("question")
            if not isinstance(image, str) or not isinstance(question, str):
                missing = "'imagename'" if not isinstance(image, str) else "'question'"
                raise TaskError(
                    f"mmvet: entry {key!r} of {data} has no string {missing} (keys: {', '.join(sorted(entry))}); "
                    "expected imagename, question, answer, capability"
                )
            caps = entry.get("capability") or []
            if isinstance(caps, str):
                caps = [caps]
            seen_caps.update(caps)
            if options.capability and not set(options.capability) & set(caps):
                continue
            answer = entry.get("answer")
            if isinstance(answer, str):
                answer = answer.replace("<AND>", " and ").replace("<OR>", " or ")
            else:
                answer = None
            rows.append(
                ImageRow(
                    id=key,
                    image=images / image,
                    prompt=question,
                    answer=answer,
                    kind=",".join(sorted(caps)) or "mmvet",
                    image_position=options.image_position,
                    meta={"capability": list(caps), "gold_raw": entry.get("answer")},
                )
            )
        unknown = sorted(set(options.capability or []) - seen_caps)
        if unknown:
            raise TaskError(
                f"mmvet: capability {', '.join(map(repr, unknown))} is in no sample of {data} (found: "
                f"{', '.join(sorted(seen_caps)) or 'none'})"
            )
        pool = "mmvet-" + (",".join(sorted(options.capability)) if options.capability else "all")
        return image_samples(
            "mmvet",
            rows,
            tokenizer,
            samples,
            seed,
            pool,
            shuffle=options.shuffle,
            target=options.target,
            max_new_tokens=options.max_new_tokens,
            chat=options.chat,
            split=options.split,
        )


# ================================================================================================== LLaVA detail
class LlavaDetailOptions(SplitOption):
    model_config = ConfigDict(extra="forbid")

    path: str = Field(description="LLaVA instruction JSON (detail_23k.json, llava_instruct_150k.json, ...)")
    image_folder: str | None = Field(
        default=None, description="folder the 'image' names are relative to (e.g. COCO train2017); null: the json's"
    )
    target: TargetKind = Field(
        default="reference",
        description="teacher-forced target: 'reference' = the full cache's greedy answer (the paper's protocol), "
        "'gold' = the first gpt turn",
    )
    max_new_tokens: int = Field(default=1024, ge=1, le=8192, description="greedy answer length (the authors: 1024)")
    image_position: ImagePosition | None = Field(
        default=None, description="image before/after the text; null: where the data's <image> placeholder is"
    )
    chat: bool | None = Field(default=None, description="use the processor's chat template (default: when it has one)")
    shuffle: bool = Field(default=True, description="draw with the seeded permutation (else file order)")


IMAGE_PLACEHOLDER = "<image>"


def _human_prompt(value: str) -> tuple[str, ImagePosition]:
    """The first human turn without LLaVA's ``<image>`` placeholder (and the newline beside it): the processor's chat
    template inserts the image itself. The placeholder's place (start or end of the turn) gives the image position."""
    stripped = value.strip()
    position: ImagePosition = "after" if stripped.endswith(IMAGE_PLACEHOLDER) else "before"
    text = "\n".join(part.strip("\n") for part in stripped.split(IMAGE_PLACEHOLDER))
    return text.strip(), position


@register_task
class LlavaDetail(Task):
    """LLaVA's instruction data (the ``detail`` descriptions of the Elastic Cache paper, or any file of that layout).

    Prompt: the first human turn (``<image>`` placeholder removed) with the image, in the processor's chat template;
    answer metadata: the first gpt turn after it. Rows without an ``image`` (text-only rows of the mixed files) are
    skipped; ``Sample.kind`` is the file's name."""

    name = "llava_detail"
    Options = LlavaDetailOptions

    def load(self, tokenizer, samples, seed, options):
        data = Path(options.path).expanduser()
        if data.is_dir():
            raise TaskError(f"llava_detail: path {str(data)!r} is a folder; pass the JSON file (e.g. detail_23k.json)")
        doc = read_json(data, "llava_detail")
        if not isinstance(doc, list):
            raise TaskError(
                f"llava_detail: {data} holds a JSON {type(doc).__name__}; expected a list of "
                '{"id", "image", "conversations": [{"from": "human", "value": ...}, {"from": "gpt", ...}]}'
            )
        folder = Path(options.image_folder).expanduser() if options.image_folder else data.parent
        if not folder.is_dir():
            raise TaskError(f"llava_detail: image_folder {str(folder)!r} does not exist")
        rows: list[ImageRow] = []
        for i, row in enumerate(doc):
            if not isinstance(row, dict):
                raise TaskError(f"llava_detail: row {i} of {data} is a {type(row).__name__}, not an object")
            rid = str(row.get("id", i))
            if not row.get("image"):
                continue  # a text-only conversation
            turns = row.get("conversations")
            if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
                raise TaskError(
                    f"llava_detail: row {rid!r} of {data} has no 'conversations' list (keys: {', '.join(sorted(row))})"
                )
            human = next((k for k, t in enumerate(turns) if t.get("from") in ("human", "user")), None)
            if human is None or not isinstance(turns[human].get("value"), str):
                raise TaskError(f"llava_detail: row {rid!r} of {data} has no human turn with a string 'value'")
            prompt, position = _human_prompt(turns[human]["value"])
            gpt = next((t for t in turns[human + 1 :] if t.get("from") in ("gpt", "assistant")), None)
            answer = gpt.get("value") if gpt is not None and isinstance(gpt.get("value"), str) else None
            rows.append(
                ImageRow(
                    id=rid,
                    image=folder / str(row["image"]),
                    prompt=prompt,
                    answer=answer,
                    kind=data.stem,
                    image_position=options.image_position or position,
                )
            )
        if not rows:
            raise TaskError(f"llava_detail: no row of {data} has an 'image'")
        return image_samples(
            "llava_detail",
            rows,
            tokenizer,
            samples,
            seed,
            f"llava_detail-{data.name}",
            shuffle=options.shuffle,
            target=options.target,
            max_new_tokens=options.max_new_tokens,
            chat=options.chat,
            split=options.split,
        )


__all__ = ["ImageRow", "LlavaDetail", "LlavaDetailOptions", "MMVet", "MMVetOptions", "image_samples", "read_json"]
