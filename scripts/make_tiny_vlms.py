"""Tiny random-init vision-language models with their processors, and small data files in every image-task layout.

    python scripts/make_tiny_vlms.py OUT        # writes OUT/llava, OUT/qwen2_vl and OUT/data

Why: no weights can be downloaded on the machines this project runs on, yet the VLM path of kvpolicy (processor chat
template -> image tokens -> typed cache positions -> per-modality budget report) has to be run end to end, from the
same commands a user with LLaVA-1.5-7B or Qwen2-VL-2B types. These models have the published checkpoints' layout at a
toy size, and processors saved with ``save_pretrained`` so that ``from_pretrained(dir)`` (and ``kvpolicy run --model
OUT/llava``) work offline:

* ``OUT/llava`` — llava-1.5 layout: CLIP vision tower (28 px, 7 px patches: 16 image tokens, CLS dropped by the
  ``default`` feature strategy) + Llama text model with GQA (4 query / 2 kv heads); processor: a Llama-style
  tokenizer (BOS added, ``<image>`` special token), CLIP image processor, llava-hf's published LLaVA-1.5 chat template
  (``USER: <image>\\n... ASSISTANT:``), ``patch_size``, ``vision_feature_select_strategy="default"``,
  ``num_additional_image_tokens=1`` as in llava-hf/llava-1.5-7b-hf.
* ``OUT/qwen2_vl`` — Qwen2-VL layout: vision transformer (2 px patches, 2x2 merge, temporal patch 2) + Qwen2 text
  model with GQA and M-RoPE; processor files as the Qwen/Qwen2-VL-2B-Instruct repository has them
  (``preprocessor_config.json``, ``tokenizer.json``, ``chat_template.json``, the published chat template with
  ``<|vision_start|><|image_pad|><|vision_end|>`` and the default system message).
* ``OUT/data`` — 32x32 PIL-drawn images and ``prompts.jsonl`` (the ``jsonl`` task), ``mm-vet/`` (``mm-vet.json`` +
  ``images/``, the MM-Vet release layout) and ``llava/detail_23k.json`` with its images in ``coco/train2017``
  (LLaVA's instruction layout, images in a separate folder as COCO's are) — the layout docs/vlm.md assumes under
  ``~/data``.

Both tokenizers are byte-level BPE without merges (every byte is a token, nothing learned, so the files are the same
on every machine) plus the special tokens each processor needs, at the ids a real vocabulary puts them: after the
base vocabulary, with the model configs' ``image_token_id`` read back from the tokenizer.

transformers 5.23 builds Qwen2-VL's processor with a video processor, and its video processors need torchvision
(not installable on the CPU-only build machines). :func:`load_processor` therefore falls back to
:class:`ImageOnlyQwen2VLProcessor` (the same class without the video half) when ``AutoProcessor`` fails for that
reason; with torchvision installed the plain ``AutoProcessor.from_pretrained(OUT/qwen2_vl)`` path is used.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

#: llava-hf/llava-1.5-7b-hf's published chat template (chat_template.json of the repository): images first, then the
#: text, then ``ASSISTANT:``
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

#: Qwen/Qwen2-VL-2B-Instruct's published chat template (the same as Qwen2-VL-7B-Instruct's)
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == "
    "'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video "
    "{{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}"
    "{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)

#: side of the generated images, and the image tokens each model makes of it (the tests count them by hand from this:
#: LLaVA: CLIP resize + crop to 28 px, (28 / 7)^2 = 16 patches, CLS dropped; Qwen2-VL: 32 x 32 px is over max_pixels
#: = 16 x 16, so it is resized to 16 x 16 px, (16 / 2)^2 = 64 patches, merged 2 x 2 -> 16 tokens)
IMAGE_SIZE = 32
LLAVA_IMAGE_TOKENS = 16
QWEN2_VL_IMAGE_TOKENS = 16

LLAVA_SPECIALS = ("<unk>", "<s>", "</s>")  # Llama's ids 0, 1, 2; the byte vocabulary follows
LLAVA_ADDED = ("<image>", "<pad>")  # after the base vocabulary, as llava-hf adds them (32000, 32001)
QWEN2_VL_ADDED = (  # after the byte vocabulary, in Qwen2's order (151643 ...)
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)


# ================================================================================================== tokenizers
def byte_level_tokenizer(first: tuple[str, ...], added: tuple[str, ...], bos: str | None) -> Any:
    """A byte-level BPE tokenizer with no merges: ``first`` special tokens at ids 0.., the 256 byte tokens, then the
    ``added`` special tokens; with ``bos`` a post-processor prepends it (as Llama's tokenizer does)."""
    from tokenizers import (
        AddedToken,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
    )

    vocab = {tok: i for i, tok in enumerate(first)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet(), key=lambda c: (ord(c) > 255, ord(c))):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (*first, *added)])
    if bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    return tok


def llava_tokenizer() -> Any:
    from transformers import PreTrainedTokenizerFast

    tok = byte_level_tokenizer(LLAVA_SPECIALS, LLAVA_ADDED, bos="<s>")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )


def qwen2_vl_tokenizer() -> Any:
    from transformers import PreTrainedTokenizerFast

    tok = byte_level_tokenizer((), QWEN2_VL_ADDED, bos=None)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")


# ================================================================================================== processors
@functools.cache
def _image_only_qwen2_vl_processor() -> type:
    from transformers import Qwen2VLProcessor
    from transformers.processing_utils import ProcessorMixin

    class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
        """``Qwen2VLProcessor`` without its video processor: transformers 5.23 requires one, and video processors
        need torchvision; images need neither. Everything else (placeholder expansion by ``image_grid_thw``,
        ``mm_token_type_ids``, the chat template) is the parent's."""

        def __init__(self, image_processor: Any = None, tokenizer: Any = None, chat_template: Any = None, **kwargs):
            self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
            self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kwargs)

    return ImageOnlyQwen2VLProcessor


def __getattr__(name: str) -> Any:  # the class is built on first use: importing transformers is slow
    if name == "ImageOnlyQwen2VLProcessor":
        return _image_only_qwen2_vl_processor()
    raise AttributeError(name)


def load_processor(path: str | Path) -> Any:
    """``AutoProcessor.from_pretrained(path)``, offline; for a Qwen2-VL directory on a machine without torchvision,
    the same processor without its video half (see the module docstring)."""
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    try:
        return AutoProcessor.from_pretrained(path, local_files_only=True)
    except ImportError as exc:
        if "torchvision" not in str(exc).lower():
            raise
        config = json.loads((Path(path) / "preprocessor_config.json").read_text())
        if config.get("processor_class") != "Qwen2VLProcessor":
            raise
    template = json.loads((Path(path) / "chat_template.json").read_text())["chat_template"]
    return _image_only_qwen2_vl_processor()(
        image_processor=AutoImageProcessor.from_pretrained(path, local_files_only=True),
        tokenizer=AutoTokenizer.from_pretrained(path, local_files_only=True),
        chat_template=template,
    )


def load_tiny(path: str | Path, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """``(model, processor)`` of a directory this script wrote: ``kvpolicy.models.load_model`` (what ``kvpolicy run
    --model DIR`` uses), or, where that fails only for want of torchvision (Qwen2-VL), the model through the same
    ``AutoModelForImageTextToText`` and the processor through :func:`load_processor`."""
    from kvpolicy.models import load_model

    try:
        return load_model(str(path), dtype=dtype)
    except ImportError as exc:
        if "torchvision" not in str(exc).lower():
            raise
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, local_files_only=True).eval()
    return model, load_processor(path)


# ================================================================================================== models
def _scale_weights(model: Any, std: float = 0.15) -> Any:
    """Larger weights than the default init, so that logits are well separated and a greedy tie cannot hide a
    difference between two caches (as the tiny models of tests/conftest.py)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, std)
    return model.eval()


def _text_kwargs(vocab: int) -> dict[str, Any]:
    return {
        "vocab_size": vocab,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
    }


def make_llava(out: str | Path, seed: int = 0) -> Path:
    """A tiny LLaVA-1.5 (CLIP + Llama, GQA 4/2) with its processor, saved into ``out``."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    out = Path(out)
    tokenizer = llava_tokenizer()
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    pad_id = tokenizer.pad_token_id
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=28, patch_size=7
    )
    text = LlamaConfig(
        **_text_kwargs(len(tokenizer)), bos_token_id=1, eos_token_id=2, pad_token_id=pad_id, rms_norm_eps=1e-5
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=image_id,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        pad_token_id=pad_id,
    )
    model = _scale_weights(LlavaForConditionalGeneration(config))
    model.generation_config.bos_token_id = 1
    model.generation_config.eos_token_id = 2
    model.generation_config.pad_token_id = pad_id
    model.save_pretrained(out)
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}, do_center_crop=True
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=vision.patch_size,
        vision_feature_select_strategy="default",
        chat_template=LLAVA_CHAT_TEMPLATE,
        num_additional_image_tokens=1,  # CLIP's CLS, as in llava-hf/llava-1.5-7b-hf's processor_config.json
    )
    processor.save_pretrained(out)
    return out


def make_qwen2_vl(out: str | Path, seed: int = 0) -> Path:
    """A tiny Qwen2-VL (GQA 4/2, M-RoPE) with its processor files (the Hub repository's layout), saved into ``out``."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    out = Path(out)
    tokenizer = qwen2_vl_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN2_VL_ADDED}
    torch.manual_seed(seed)
    config = Qwen2VLConfig(
        text_config=dict(
            **_text_kwargs(len(tokenizer)),
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
            bos_token_id=ids["<|endoftext|>"],  # as Qwen2-VL-2B-Instruct's config (151643)
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config={
            "depth": 1,
            "embed_dim": 16,
            "hidden_size": 64,
            "num_heads": 2,
            "patch_size": 2,
            "temporal_patch_size": 2,
            "in_channels": 3,
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    model = _scale_weights(Qwen2VLForConditionalGeneration(config))
    model.generation_config.eos_token_id = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=2, temporal_patch_size=2, merge_size=2, min_pixels=8 * 8, max_pixels=16 * 16
    )
    image_processor.save_pretrained(out)
    # the Hub repository's layout: the image processor's file names the processor class, the template has its own file
    pre = json.loads((out / "preprocessor_config.json").read_text())
    pre.update(processor_class="Qwen2VLProcessor", image_processor_type="Qwen2VLImageProcessor")
    (out / "preprocessor_config.json").write_text(json.dumps(pre, indent=2) + "\n")
    (out / "chat_template.json").write_text(json.dumps({"chat_template": QWEN2_VL_CHAT_TEMPLATE}, indent=2) + "\n")
    return out


# ================================================================================================== data
@dataclass(frozen=True)
class TinyData:
    """Where :func:`make_data` put each layout."""

    root: Path
    jsonl: Path  #: the ``jsonl`` task's file
    mmvet: Path  #: the MM-Vet folder (mm-vet.json + images/)
    llava_json: Path  #: LLaVA instruction json
    llava_images: Path  #: its image folder (the ``image_folder`` option)


QUESTIONS = [
    ("What shape is in the middle of the picture?", "A red square.", ["rec"]),
    ("How many circles are there? Answer with a number.", "2", ["rec", "math"]),
    ("What is written on the sign?", "STOP<OR>stop", ["ocr"]),
    ("Which colour is the background, and is it darker than the shape?", "blue<AND>yes", ["rec", "spat"]),
]


def make_images(folder: str | Path, names: list[str]) -> list[Path]:
    """Small drawings (a square, circles, a word, stripes), one per name; the last one is saved as an 8-bit
    grayscale PNG so that loaders must convert to RGB."""
    from PIL import Image, ImageDraw

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    n = IMAGE_SIZE
    for k, name in enumerate(names):
        img = Image.new("RGB", (n, n), (20, 40, 160 - 30 * (k % 4)))
        draw = ImageDraw.Draw(img)
        if k % 4 == 0:
            draw.rectangle([8, 8, 23, 23], fill=(220, 30, 30))
        elif k % 4 == 1:
            draw.ellipse([2, 2, 13, 13], fill=(30, 200, 30))
            draw.ellipse([18, 18, 29, 29], fill=(30, 200, 30))
        elif k % 4 == 2:
            draw.text((2, 10), "STOP", fill=(255, 255, 255))
        else:
            for x in range(0, n, 6):
                draw.line([x, 0, x, n], fill=(250, 250, 0), width=2)
        path = folder / name
        if k == len(names) - 1:
            img = img.convert("L")
        img.save(path)
        paths.append(path)
    return paths


def make_data(root: str | Path) -> TinyData:
    """Small files in the three layouts the image tasks read (see the module docstring)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    # jsonl: images relative to the file
    images = make_images(root / "images", [f"img{k}.png" for k in range(len(QUESTIONS))])
    jsonl = root / "prompts.jsonl"
    with jsonl.open("w", encoding="utf-8") as fh:
        for k, ((question, answer, _), image) in enumerate(zip(QUESTIONS, images)):
            row: dict[str, Any] = {"id": f"q{k}", "prompt": question, "image": f"images/{image.name}"}
            if k % 2:
                row["answer"] = answer.split("<")[0]
            fh.write(json.dumps(row) + "\n")
    # MM-Vet release layout
    mmvet = root / "mm-vet"
    names = [f"v1_{k}.png" for k in range(len(QUESTIONS))]
    make_images(mmvet / "images", names)
    doc = {
        f"v1_{k}": {"imagename": name, "question": q, "answer": a, "capability": caps}
        for k, (name, (q, a, caps)) in enumerate(zip(names, QUESTIONS))
    }
    (mmvet / "mm-vet.json").write_text(json.dumps(doc, indent=2) + "\n")
    # LLaVA instruction layout, images in a COCO-like folder beside it
    llava = root / "llava"
    coco = root / "coco" / "train2017"
    jpgs = [f"{k:012d}.jpg" for k in range(1, len(QUESTIONS) + 1)]
    for path in make_images(coco, [n.replace(".jpg", ".png") for n in jpgs]):
        from PIL import Image

        with Image.open(path) as img:
            img.convert("RGB").save(path.with_suffix(".jpg"), quality=90)
        path.unlink()
    rows = []
    for k, (name, (_, answer, _)) in enumerate(zip(jpgs, QUESTIONS)):
        prompt = ["Describe the following image.", "What do you see happening in this image?"][k % 2]
        human = f"<image>\n{prompt}" if k != 1 else f"{prompt}\n<image>"
        rows.append(
            {
                "id": name[:-4],
                "image": name,
                "conversations": [
                    {"from": "human", "value": human},
                    {"from": "gpt", "value": f"The image shows a small drawing. {answer.split('<')[0]}"},
                ],
            }
        )
    llava.mkdir(parents=True, exist_ok=True)
    llava_json = llava / "detail_23k.json"
    llava_json.write_text(json.dumps(rows, indent=2) + "\n")
    return TinyData(root=root, jsonl=jsonl, mmvet=mmvet, llava_json=llava_json, llava_images=coco)


@dataclass(frozen=True)
class TinyVLMs:
    """What :func:`make_all` wrote."""

    llava: Path
    qwen2_vl: Path
    data: TinyData


def make_all(out: str | Path, seed: int = 0) -> TinyVLMs:
    """Both models and the data, under ``out/llava``, ``out/qwen2_vl`` and ``out/data``."""
    out = Path(out)
    return TinyVLMs(
        llava=make_llava(out / "llava", seed),
        qwen2_vl=make_qwen2_vl(out / "qwen2_vl", seed),
        data=make_data(out / "data"),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="folder to write llava/, qwen2_vl/ and data/ into")
    parser.add_argument("--seed", type=int, default=0, help="weight initialisation seed")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    built = make_all(args.out, args.seed)
    print(f"llava: {built.llava}\nqwen2_vl: {built.qwen2_vl}\ndata: {built.data.root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
